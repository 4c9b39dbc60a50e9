//! The storage openmls keeps a conversation's state in: a map in memory, values in postcard.
//!
//! openmls hands its storage provider typed values (serde) and writes some of them on every
//! message: each application message sent or read rewrites the group's message secrets (the
//! secret tree and its ratchets, minus the key just used). openmls's own memory storage encodes
//! every value as JSON, byte arrays as lists of decimal numbers; that encoding was a fifth of
//! the instructions of a 1:1 message (docs/BENCHMARKS.md). This storage keeps the same map
//! shape and encodes values with postcard, a compact binary serde format (varint lengths, a
//! byte per byte), so a message costs a few hundred nanoseconds of encoding instead.
//!
//! What it guarantees, beyond the map:
//!
//! - **Old values are wiped.** A value that is replaced or deleted is zeroed before its memory
//!   is freed, and a value being written never leaves an unwiped copy behind when its buffer
//!   grows. The message secrets openmls writes after each message no longer hold the key it
//!   used; wiping the previous value is what makes that deletion real in memory.
//! - **Bytes from a file never panic.** Every read checks that the value decodes as the type
//!   asked for and that nothing is left over, and reports a [`StorageError`] otherwise.
//! - **One encoding per state version.** Keys are a one-byte [`Label`] followed by the postcard
//!   encoding of openmls's key; [`super::state`] writes the map out sorted by key and carries a
//!   version, which must change with anything here.
//!
//! One value is not postcard: the group's join configuration, whose past-epoch policy
//! deserialises through serde's `untagged` enums, which only a self-describing format can
//! read. It stays JSON; openmls writes it when a group is created or joined, never per message.

use std::collections::BTreeMap;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openmls_traits::storage::{CURRENT_VERSION, Key, StorageProvider, traits};
use serde::Serialize;
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

// openmls versions its storage values; a new version means new value types, which this module
// and the state version must follow.
const _: () = assert!(CURRENT_VERSION == 1);

/// What a key is the key of. The discriminant is the key's first byte, in state at rest too:
/// never renumber, only add.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Label {
    JoinConfig = 1,
    OwnLeafNodes = 2,
    QueuedProposal = 3,
    ProposalQueueRefs = 4,
    Tree = 5,
    InterimTranscriptHash = 6,
    GroupContext = 7,
    ConfirmationTag = 8,
    GroupState = 9,
    MessageSecrets = 10,
    ResumptionPskStore = 11,
    OwnLeafIndex = 12,
    EpochSecrets = 13,
    SignatureKeyPair = 14,
    EncryptionKeyPair = 15,
    EpochKeyPairs = 16,
    KeyPackage = 17,
    Psk = 18,
    /// Syncra's own record, not openmls's: the members of a group let back in
    /// ([`super::conversation`]), kept with the group's state.
    Readmissions = 19,
}

/// A value that would not encode, or stored bytes that do not decode.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// openmls handed over a value or key postcard cannot encode.
    #[error("could not encode the {0} record of an MLS state: {1}")]
    Encode(&'static str, String),
    /// A stored value is not what its key says (damaged or foreign state).
    #[error(
        "the {0} record of this MLS state does not decode: damaged, or written in another format"
    )]
    Decode(&'static str),
}

/// The map openmls reads and writes, sorted by key.
pub(crate) type Entries = BTreeMap<Vec<u8>, Zeroizing<Vec<u8>>>;

/// One conversation's (or the KeyPackage store's) openmls state. See the module docs.
#[derive(Default)]
pub(crate) struct Storage {
    values: RwLock<Entries>,
}

impl Storage {
    /// A storage holding `entries`, as [`super::state`] read them.
    pub(crate) fn from_entries(entries: Entries) -> Self {
        Storage {
            values: RwLock::new(entries),
        }
    }

    /// The entries, for [`super::state`] to write out.
    pub(crate) fn entries(&self) -> RwLockReadGuard<'_, Entries> {
        // A poisoned lock means a panic elsewhere while holding it; every entry is written in
        // one insert, so the map itself is still whole.
        self.values.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn entries_mut(&self) -> RwLockWriteGuard<'_, Entries> {
        self.values.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(
        &self,
        label: Label,
        key: &impl Serialize,
        value: &impl Serialize,
    ) -> Result<(), StorageError> {
        let key = storage_key(label, key)?;
        // openmls rewrites the same entries with values of about the same size: start from the
        // old size so that the buffer rarely grows.
        let hint = self.entries().get(&key).map_or(0, |old| old.len());
        let value = encode(label, value, hint)?;
        // Dropping the old value wipes it.
        self.entries_mut().insert(key, value);
        Ok(())
    }

    fn read<V: DeserializeOwned>(
        &self,
        label: Label,
        key: &impl Serialize,
    ) -> Result<Option<V>, StorageError> {
        let key = storage_key(label, key)?;
        self.entries()
            .get(&key)
            .map(|bytes| decode(label, bytes))
            .transpose()
    }

    /// The members of a group let back in, as [`super::conversation`] keeps them.
    pub(crate) fn readmissions<V: DeserializeOwned>(
        &self,
        group_id: &[u8],
    ) -> Result<Option<V>, StorageError> {
        self.read(Label::Readmissions, &group_id)
    }

    /// Replaces the members of a group let back in.
    pub(crate) fn write_readmissions(
        &self,
        group_id: &[u8],
        value: &impl Serialize,
    ) -> Result<(), StorageError> {
        self.write(Label::Readmissions, &group_id, value)
    }

    fn delete(&self, label: Label, key: &impl Serialize) -> Result<(), StorageError> {
        let key = storage_key(label, key)?;
        self.entries_mut().remove(&key);
        Ok(())
    }

    /// A list entry: the postcard encodings of its items, in order. Lists hold public values
    /// (own leaf nodes, proposal references), so their items are not wiped.
    fn read_items(&self, label: Label, key: &[u8]) -> Result<Vec<Vec<u8>>, StorageError> {
        Ok(self
            .entries()
            .get(key)
            .map(|bytes| decode::<Vec<Vec<u8>>>(label, bytes))
            .transpose()?
            .unwrap_or_default())
    }

    fn read_list<V: DeserializeOwned>(
        &self,
        label: Label,
        key: &impl Serialize,
    ) -> Result<Vec<V>, StorageError> {
        let key = storage_key(label, key)?;
        self.read_items(label, &key)?
            .iter()
            .map(|item| decode(label, item))
            .collect()
    }

    fn append(
        &self,
        label: Label,
        key: &impl Serialize,
        item: &impl Serialize,
    ) -> Result<(), StorageError> {
        let key = storage_key(label, key)?;
        let item = postcard::to_allocvec(item)
            .map_err(|e| StorageError::Encode(label_name(label), e.to_string()))?;
        let mut items = self.read_items(label, &key)?;
        items.push(item);
        let value = encode(label, &items, 0)?;
        self.entries_mut().insert(key, value);
        Ok(())
    }

    fn remove_item(
        &self,
        label: Label,
        key: &impl Serialize,
        item: &impl Serialize,
    ) -> Result<(), StorageError> {
        let key = storage_key(label, key)?;
        let item = postcard::to_allocvec(item)
            .map_err(|e| StorageError::Encode(label_name(label), e.to_string()))?;
        let mut items = self.read_items(label, &key)?;
        if let Some(at) = items.iter().position(|stored| *stored == item) {
            items.remove(at);
        }
        let value = encode(label, &items, 0)?;
        self.entries_mut().insert(key, value);
        Ok(())
    }
}

fn label_name(label: Label) -> &'static str {
    match label {
        Label::JoinConfig => "join config",
        Label::OwnLeafNodes => "own leaf nodes",
        Label::QueuedProposal => "queued proposal",
        Label::ProposalQueueRefs => "proposal queue",
        Label::Tree => "tree",
        Label::InterimTranscriptHash => "interim transcript hash",
        Label::GroupContext => "group context",
        Label::ConfirmationTag => "confirmation tag",
        Label::GroupState => "group state",
        Label::MessageSecrets => "message secrets",
        Label::ResumptionPskStore => "resumption PSK store",
        Label::OwnLeafIndex => "own leaf index",
        Label::EpochSecrets => "epoch secrets",
        Label::SignatureKeyPair => "signature key pair",
        Label::EncryptionKeyPair => "encryption key pair",
        Label::EpochKeyPairs => "epoch key pairs",
        Label::KeyPackage => "KeyPackage",
        Label::Psk => "PSK",
        Label::Readmissions => "readmissions",
    }
}

/// The label's byte, then openmls's key in postcard (length-prefixed, so no two keys of one
/// label run into each other).
fn storage_key(label: Label, key: &impl Serialize) -> Result<Vec<u8>, StorageError> {
    postcard::to_extend(key, vec![label as u8])
        .map_err(|e| StorageError::Encode(label_name(label), e.to_string()))
}

/// A value in its encoding: postcard, or JSON for the join configuration (module docs).
fn encode(
    label: Label,
    value: &impl Serialize,
    hint: usize,
) -> Result<Zeroizing<Vec<u8>>, StorageError> {
    let failed = |e: String| StorageError::Encode(label_name(label), e);
    if label == Label::JoinConfig {
        // Holds no secret; serde_json grows its buffer freely.
        return serde_json::to_vec(value)
            .map(Zeroizing::new)
            .map_err(|e| failed(e.to_string()));
    }
    postcard::serialize_with_flavor(value, Wiping::with_capacity(hint.max(64)))
        .map_err(|e| failed(e.to_string()))
}

/// The value `bytes` hold, which must be all of them.
fn decode<V: DeserializeOwned>(label: Label, bytes: &[u8]) -> Result<V, StorageError> {
    let bad = || StorageError::Decode(label_name(label));
    if label == Label::JoinConfig {
        return serde_json::from_slice(bytes).map_err(|_| bad());
    }
    match postcard::take_from_bytes(bytes) {
        Ok((value, [])) => Ok(value),
        _ => Err(bad()),
    }
}

/// A postcard output buffer that wipes what it leaves behind: when it must grow, it copies
/// into a larger buffer and zeroes the old one, where `Vec` would free it as it is.
struct Wiping(Zeroizing<Vec<u8>>);

impl Wiping {
    fn with_capacity(capacity: usize) -> Self {
        Wiping(Zeroizing::new(Vec::with_capacity(capacity)))
    }

    /// Room for `more` bytes, in a new buffer; rare, as the first one is sized from the value
    /// this one replaces.
    #[cold]
    #[inline(never)]
    fn grow(&mut self, more: usize) {
        let needed = self.0.len() + more;
        let mut bigger = Vec::with_capacity(needed.max(2 * self.0.capacity()));
        bigger.extend_from_slice(&self.0);
        // The old buffer is zeroed as it drops.
        self.0 = Zeroizing::new(bigger);
    }
}

impl postcard::ser_flavors::Flavor for Wiping {
    type Output = Zeroizing<Vec<u8>>;

    // Called once per byte of every byte vector (serde encodes `Vec<u8>` element by element):
    // keep the common path to a comparison and a store.
    #[inline]
    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        if self.0.len() == self.0.capacity() {
            self.grow(1);
        }
        self.0.push(byte);
        Ok(())
    }

    #[inline]
    fn try_extend(&mut self, bytes: &[u8]) -> postcard::Result<()> {
        if self.0.capacity() - self.0.len() < bytes.len() {
            self.grow(bytes.len());
        }
        self.0.extend_from_slice(bytes);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<Self::Output> {
        Ok(self.0)
    }
}

/// The key of a group's encryption key pairs for one epoch and leaf.
fn epoch_key(
    group_id: &impl Key<CURRENT_VERSION>,
    epoch: &impl Key<CURRENT_VERSION>,
    leaf_index: u32,
) -> impl Serialize {
    (group_id, epoch, leaf_index)
}

impl StorageProvider<CURRENT_VERSION> for Storage {
    type Error = StorageError;

    fn write_mls_join_config<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        config: &MlsGroupJoinConfig,
    ) -> Result<(), Self::Error> {
        self.write(Label::JoinConfig, group_id, config)
    }

    fn append_own_leaf_node<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNode: traits::LeafNode<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        leaf_node: &LeafNode,
    ) -> Result<(), Self::Error> {
        self.append(Label::OwnLeafNodes, group_id, leaf_node)
    }

    fn queue_proposal<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
        QueuedProposal: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
        proposal: &QueuedProposal,
    ) -> Result<(), Self::Error> {
        self.write(Label::QueuedProposal, &(group_id, proposal_ref), proposal)?;
        self.append(Label::ProposalQueueRefs, group_id, proposal_ref)
    }

    fn write_tree<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        TreeSync: traits::TreeSync<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        tree: &TreeSync,
    ) -> Result<(), Self::Error> {
        self.write(Label::Tree, group_id, tree)
    }

    fn write_interim_transcript_hash<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        interim_transcript_hash: &InterimTranscriptHash,
    ) -> Result<(), Self::Error> {
        self.write(
            Label::InterimTranscriptHash,
            group_id,
            interim_transcript_hash,
        )
    }

    fn write_context<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupContext: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_context: &GroupContext,
    ) -> Result<(), Self::Error> {
        self.write(Label::GroupContext, group_id, group_context)
    }

    fn write_confirmation_tag<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ConfirmationTag: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        confirmation_tag: &ConfirmationTag,
    ) -> Result<(), Self::Error> {
        self.write(Label::ConfirmationTag, group_id, confirmation_tag)
    }

    fn write_group_state<
        GroupState: traits::GroupState<CURRENT_VERSION>,
        GroupId: traits::GroupId<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_state: &GroupState,
    ) -> Result<(), Self::Error> {
        self.write(Label::GroupState, group_id, group_state)
    }

    fn write_message_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MessageSecrets: traits::MessageSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        message_secrets: &MessageSecrets,
    ) -> Result<(), Self::Error> {
        self.write(Label::MessageSecrets, group_id, message_secrets)
    }

    fn write_resumption_psk_store<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        resumption_psk_store: &ResumptionPskStore,
    ) -> Result<(), Self::Error> {
        self.write(Label::ResumptionPskStore, group_id, resumption_psk_store)
    }

    fn write_own_leaf_index<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        own_leaf_index: &LeafNodeIndex,
    ) -> Result<(), Self::Error> {
        self.write(Label::OwnLeafIndex, group_id, own_leaf_index)
    }

    fn write_group_epoch_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_epoch_secrets: &GroupEpochSecrets,
    ) -> Result<(), Self::Error> {
        self.write(Label::EpochSecrets, group_id, group_epoch_secrets)
    }

    fn write_signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
        signature_key_pair: &SignatureKeyPair,
    ) -> Result<(), Self::Error> {
        self.write(Label::SignatureKeyPair, public_key, signature_key_pair)
    }

    fn write_encryption_key_pair<
        EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &EncryptionKey,
        key_pair: &HpkeKeyPair,
    ) -> Result<(), Self::Error> {
        self.write(Label::EncryptionKeyPair, public_key, key_pair)
    }

    fn write_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
        key_pairs: &[HpkeKeyPair],
    ) -> Result<(), Self::Error> {
        self.write(
            Label::EpochKeyPairs,
            &epoch_key(group_id, epoch, leaf_index),
            &key_pairs,
        )
    }

    fn write_key_package<
        HashReference: traits::HashReference<CURRENT_VERSION>,
        KeyPackage: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &HashReference,
        key_package: &KeyPackage,
    ) -> Result<(), Self::Error> {
        self.write(Label::KeyPackage, hash_ref, key_package)
    }

    fn write_psk<
        PskId: traits::PskId<CURRENT_VERSION>,
        PskBundle: traits::PskBundle<CURRENT_VERSION>,
    >(
        &self,
        psk_id: &PskId,
        psk: &PskBundle,
    ) -> Result<(), Self::Error> {
        self.write(Label::Psk, psk_id, psk)
    }

    fn mls_group_join_config<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<MlsGroupJoinConfig>, Self::Error> {
        self.read(Label::JoinConfig, group_id)
    }

    fn own_leaf_nodes<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNode: traits::LeafNode<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<LeafNode>, Self::Error> {
        self.read_list(Label::OwnLeafNodes, group_id)
    }

    fn queued_proposal_refs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<ProposalRef>, Self::Error> {
        self.read_list(Label::ProposalQueueRefs, group_id)
    }

    fn queued_proposals<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
        QueuedProposal: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<(ProposalRef, QueuedProposal)>, Self::Error> {
        let refs: Vec<ProposalRef> = self.read_list(Label::ProposalQueueRefs, group_id)?;
        refs.into_iter()
            .map(|proposal_ref| {
                // A reference without its proposal is damaged state, not an empty queue.
                let proposal = self
                    .read(Label::QueuedProposal, &(group_id, &proposal_ref))?
                    .ok_or(StorageError::Decode(label_name(Label::QueuedProposal)))?;
                Ok((proposal_ref, proposal))
            })
            .collect()
    }

    fn tree<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        TreeSync: traits::TreeSync<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<TreeSync>, Self::Error> {
        self.read(Label::Tree, group_id)
    }

    fn group_context<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupContext: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupContext>, Self::Error> {
        self.read(Label::GroupContext, group_id)
    }

    fn interim_transcript_hash<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<InterimTranscriptHash>, Self::Error> {
        self.read(Label::InterimTranscriptHash, group_id)
    }

    fn confirmation_tag<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ConfirmationTag: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<ConfirmationTag>, Self::Error> {
        self.read(Label::ConfirmationTag, group_id)
    }

    fn group_state<
        GroupState: traits::GroupState<CURRENT_VERSION>,
        GroupId: traits::GroupId<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupState>, Self::Error> {
        self.read(Label::GroupState, group_id)
    }

    fn message_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MessageSecrets: traits::MessageSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<MessageSecrets>, Self::Error> {
        self.read(Label::MessageSecrets, group_id)
    }

    fn resumption_psk_store<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<ResumptionPskStore>, Self::Error> {
        self.read(Label::ResumptionPskStore, group_id)
    }

    fn own_leaf_index<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<LeafNodeIndex>, Self::Error> {
        self.read(Label::OwnLeafIndex, group_id)
    }

    fn group_epoch_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupEpochSecrets>, Self::Error> {
        self.read(Label::EpochSecrets, group_id)
    }

    fn signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Result<Option<SignatureKeyPair>, Self::Error> {
        self.read(Label::SignatureKeyPair, public_key)
    }

    fn encryption_key_pair<
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
        EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>,
    >(
        &self,
        public_key: &EncryptionKey,
    ) -> Result<Option<HpkeKeyPair>, Self::Error> {
        self.read(Label::EncryptionKeyPair, public_key)
    }

    fn encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<Vec<HpkeKeyPair>, Self::Error> {
        Ok(self
            .read(
                Label::EpochKeyPairs,
                &epoch_key(group_id, epoch, leaf_index),
            )?
            .unwrap_or_default())
    }

    fn key_package<
        KeyPackageRef: traits::HashReference<CURRENT_VERSION>,
        KeyPackage: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<Option<KeyPackage>, Self::Error> {
        self.read(Label::KeyPackage, hash_ref)
    }

    fn psk<PskBundle: traits::PskBundle<CURRENT_VERSION>, PskId: traits::PskId<CURRENT_VERSION>>(
        &self,
        psk_id: &PskId,
    ) -> Result<Option<PskBundle>, Self::Error> {
        self.read(Label::Psk, psk_id)
    }

    fn remove_proposal<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
    ) -> Result<(), Self::Error> {
        self.remove_item(Label::ProposalQueueRefs, group_id, proposal_ref)?;
        self.delete(Label::QueuedProposal, &(group_id, proposal_ref))
    }

    fn delete_own_leaf_nodes<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(Label::OwnLeafNodes, group_id)
    }

    fn delete_group_config<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(Label::JoinConfig, group_id)
    }

    fn delete_tree<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(Label::Tree, group_id)
    }

    fn delete_confirmation_tag<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(Label::ConfirmationTag, group_id)
    }

    fn delete_group_state<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(Label::GroupState, group_id)
    }

    fn delete_context<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(Label::GroupContext, group_id)
    }

    fn delete_interim_transcript_hash<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(Label::InterimTranscriptHash, group_id)
    }

    fn delete_message_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(Label::MessageSecrets, group_id)
    }

    fn delete_all_resumption_psk_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(Label::ResumptionPskStore, group_id)
    }

    fn delete_own_leaf_index<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(Label::OwnLeafIndex, group_id)
    }

    fn delete_group_epoch_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(Label::EpochSecrets, group_id)
    }

    fn clear_proposal_queue<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        let refs: Vec<ProposalRef> = self.read_list(Label::ProposalQueueRefs, group_id)?;
        for proposal_ref in refs {
            self.delete(Label::QueuedProposal, &(group_id, &proposal_ref))?;
        }
        self.delete(Label::ProposalQueueRefs, group_id)
    }

    fn delete_signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Result<(), Self::Error> {
        self.delete(Label::SignatureKeyPair, public_key)
    }

    fn delete_encryption_key_pair<EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>>(
        &self,
        public_key: &EncryptionKey,
    ) -> Result<(), Self::Error> {
        self.delete(Label::EncryptionKeyPair, public_key)
    }

    fn delete_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<(), Self::Error> {
        self.delete(
            Label::EpochKeyPairs,
            &epoch_key(group_id, epoch, leaf_index),
        )
    }

    fn delete_key_package<KeyPackageRef: traits::HashReference<CURRENT_VERSION>>(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<(), Self::Error> {
        self.delete(Label::KeyPackage, hash_ref)
    }

    fn delete_psk<PskKey: traits::PskId<CURRENT_VERSION>>(
        &self,
        psk_id: &PskKey,
    ) -> Result<(), Self::Error> {
        self.delete(Label::Psk, psk_id)
    }
}

#[cfg(test)]
mod tests {
    use openmls_traits::storage::Entity;
    use serde::Deserialize;

    use super::*;

    /// Stand-ins for openmls's types: the storage sees only their serde form.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Id(Vec<u8>);
    impl Key<CURRENT_VERSION> for Id {}
    impl traits::GroupId<CURRENT_VERSION> for Id {}

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Ref(u32);
    impl Key<CURRENT_VERSION> for Ref {}
    impl Entity<CURRENT_VERSION> for Ref {}
    impl traits::ProposalRef<CURRENT_VERSION> for Ref {}

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Proposal(String);
    impl Entity<CURRENT_VERSION> for Proposal {}
    impl traits::QueuedProposal<CURRENT_VERSION> for Proposal {}

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Secrets(Vec<u8>);
    impl Entity<CURRENT_VERSION> for Secrets {}
    impl traits::MessageSecrets<CURRENT_VERSION> for Secrets {}

    #[test]
    fn values_round_trip_and_damage_is_an_error() {
        let s = Storage::default();
        let group = Id(b"group".to_vec());
        // Larger than the first buffer: the value grows through `Wiping::grow`.
        let secrets = Secrets((0..=255).cycle().take(5000).collect());
        s.write_message_secrets(&group, &secrets).unwrap();
        let back: Option<Secrets> = s.message_secrets(&group).unwrap();
        assert_eq!(back, Some(secrets));
        let other: Option<Secrets> = s.message_secrets(&Id(b"other".to_vec())).unwrap();
        assert_eq!(other, None);

        // A trailing byte, a truncation, another type: errors, not panics or garbage.
        let key = storage_key(Label::MessageSecrets, &group).unwrap();
        let good = s.entries()[&key].to_vec();
        for bad in [
            [good.as_slice(), &[0]].concat(),
            good[..good.len() - 1].to_vec(),
        ] {
            s.entries_mut().insert(key.clone(), Zeroizing::new(bad));
            let read: Result<Option<Secrets>, _> = s.message_secrets(&group);
            assert!(matches!(read, Err(StorageError::Decode(_))));
        }
        s.entries_mut().insert(key, Zeroizing::new(vec![0xff; 3]));
        let read: Result<Option<Proposal>, _> = s.read(Label::MessageSecrets, &group);
        assert!(read.is_err());
    }

    #[test]
    fn the_proposal_queue_keeps_order_and_clears_completely() {
        let s = Storage::default();
        let group = Id(b"group".to_vec());
        for n in 1..=3 {
            s.queue_proposal(&group, &Ref(n), &Proposal(format!("p{n}")))
                .unwrap();
        }
        s.remove_proposal(&group, &Ref(2)).unwrap();
        let queued: Vec<(Ref, Proposal)> = s.queued_proposals(&group).unwrap();
        assert_eq!(
            queued,
            vec![
                (Ref(1), Proposal("p1".into())),
                (Ref(3), Proposal("p3".into()))
            ]
        );
        <Storage as StorageProvider<CURRENT_VERSION>>::clear_proposal_queue::<Id, Ref>(&s, &group)
            .unwrap();
        // Nothing of the queue is left behind: not the references, not the proposals.
        assert!(s.entries().is_empty());
    }
}

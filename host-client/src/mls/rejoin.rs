//! Letting a member back in whose copy of a conversation fell behind for good.
//!
//! The relay delivers a group's commits in order, through the mailbox to members who are away,
//! yet a commit can still be lost for one member: delivered live to a process that died before
//! processing it, or dropped by the mailbox once its time to live ran out. That member then
//! meets messages from epochs it cannot reach ([`MlsError::FutureEpoch`]) and would read
//! nothing more in the conversation. MLS has no way to fetch a missed commit's secrets later
//! (they are gone on purpose), so the way back is to be added again:
//!
//! 1. The stuck member sends the others a **rejoin request** (carriage kind `rejoin`): a fresh
//!    one-time KeyPackage of its own, the public encryption key of its leaf as its copy knows
//!    it, and — in the carriage header — the group and the epoch it is stuck in, all signed
//!    with its identity key.
//! 2. Any member who holds the request valid commits, in one commit, the removal of the stuck
//!    leaf and the addition of that KeyPackage, and sends the Welcome to the member alone.
//! 3. The stuck member joins from the Welcome and replaces its copy with the new one. What was
//!    sent while it was out of step stays unreadable (forward secrecy), everything after reads.
//!
//! **Why the leaf key.** Only its owner changes a leaf (its own update or commit), and a stuck
//! member can make neither, so a request naming the leaf the group holds for that member now
//! was made since the member's last rejoin. Once a rejoin happened the leaf is new and the
//! request — or the relay replaying it later — names a key no longer in the tree: refused
//! ([`MlsError::StaleRejoin`]). That also makes the members who race to answer one request
//! harmless: the relay accepts one commit for the epoch, the others find the request stale.
//!
//! **A lost Welcome.** The Welcome of a return can itself be lost (the same ways a commit
//! can); the member's copy then still knows the old leaf, which the group no longer holds. Its
//! client asks again after a while ([`crate::client::REJOIN_RETRY`], doubling), naming that
//! leaf with a fresh KeyPackage. So every member keeps, with the group's state, the last
//! returns it saw (who, the leaf removed, the leaf added): a request naming a leaf its sender
//! left when let back in before is taken — the member's leaf now is the one replaced — as long
//! as its KeyPackage was not used since (the leaf it would add is not the member's leaf now,
//! nor one an earlier return added). A replay of an answered request stays stale; the relay
//! holding back a request the member made and releasing it later can cause at most one more
//! return per request the member made.
//!
//! **What a malicious relay can do with it**: nothing a member could not. It cannot forge a
//! request (the signature), cannot point one at another group or epoch (both are signed), and
//! a member only readmits a member who is in the group, with that member's own KeyPackage.

use syncra_core::crypto::keys::{IdentityPublicKey, verify_signature};
use syncra_core::crypto::transcript::Transcript;

use super::conversation::{ConversationId, MemberKeyPackage};
use super::error::MlsError;
use super::identity::IdentitySigner;

/// The layout's version byte.
const VERSION: u8 = 1;
/// The domain of the signed transcript.
const DOMAIN: &str = "syncra/v1/mls-rejoin";
/// An HPKE public key of the suite is 32 bytes; anything much longer is not a leaf key.
const MAX_LEAF_KEY: usize = 256;
/// An Ed25519 signature.
const SIGNATURE_LEN: usize = 64;

/// A member's request to be let back into a conversation, checked against its signature.
#[derive(Clone)]
pub struct RejoinRequest {
    /// The conversation.
    pub group: ConversationId,
    /// The epoch the member's copy is stuck in.
    pub epoch: u64,
    /// The public encryption key of the member's leaf, as its copy knows it.
    pub leaf_key: Vec<u8>,
    /// The KeyPackage to add it back with (its owner is the member asking).
    pub package: MemberKeyPackage,
}

impl std::fmt::Debug for RejoinRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RejoinRequest({}, {}, stuck in epoch {})",
            self.group,
            self.package.user_id(),
            self.epoch
        )
    }
}

fn transcript(group: ConversationId, epoch: u64, leaf_key: &[u8], package: &[u8]) -> Vec<u8> {
    let mut t = Transcript::new(DOMAIN);
    t.fixed(group.as_bytes())
        .u64(epoch)
        .bytes(leaf_key)
        .bytes(package);
    t.finish()
}

/// The request's bytes (the carriage body): version, leaf key, KeyPackage, signature.
///
/// ```text
/// 0x01 | leaf key length u16 | leaf key | KeyPackage length u32 | KeyPackage | signature [64]
/// ```
pub(crate) fn encode(
    signer: &IdentitySigner,
    group: ConversationId,
    epoch: u64,
    leaf_key: &[u8],
    package: &[u8],
) -> Vec<u8> {
    let signature = signer.sign_transcript(&transcript(group, epoch, leaf_key, package));
    let mut out = Vec::with_capacity(1 + 2 + leaf_key.len() + 4 + package.len() + SIGNATURE_LEN);
    out.push(VERSION);
    out.extend_from_slice(&(leaf_key.len().min(u16::MAX as usize) as u16).to_be_bytes());
    out.extend_from_slice(leaf_key);
    out.extend_from_slice(&(package.len().min(u32::MAX as usize) as u32).to_be_bytes());
    out.extend_from_slice(package);
    out.extend_from_slice(&signature);
    out
}

impl RejoinRequest {
    /// Reads a request for `group`, stuck in `epoch` (both from the carriage header, both
    /// signed): its layout, its KeyPackage (signature, suite, bound to its key) and the
    /// signature of the KeyPackage's owner over all of it. Whether it holds against a copy of
    /// the conversation is [`super::Conversation::check_rejoin`]'s to say.
    pub fn from_bytes(
        bytes: &[u8],
        group: ConversationId,
        epoch: u64,
    ) -> Result<RejoinRequest, MlsError> {
        decode(bytes, group, epoch)
    }
}

fn decode(bytes: &[u8], group: ConversationId, epoch: u64) -> Result<RejoinRequest, MlsError> {
    let malformed = || MlsError::Malformed {
        expected: "rejoin request",
    };
    let (&version, rest) = bytes.split_first().ok_or_else(malformed)?;
    if version != VERSION {
        return Err(malformed());
    }
    let (len, rest) = rest.split_at_checked(2).ok_or_else(malformed)?;
    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    if len == 0 || len > MAX_LEAF_KEY {
        return Err(malformed());
    }
    let (leaf_key, rest) = rest.split_at_checked(len).ok_or_else(malformed)?;
    let (len, rest) = rest.split_at_checked(4).ok_or_else(malformed)?;
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    let (package_bytes, signature) = rest.split_at_checked(len).ok_or_else(malformed)?;
    let signature: [u8; SIGNATURE_LEN] = signature.try_into().map_err(|_| malformed())?;
    let package = MemberKeyPackage::from_bytes_of_anyone(package_bytes)?;
    // The KeyPackage's signature key is its owner's identity key (checked by the binding).
    let key: IdentityPublicKey = package
        .signature_key()
        .try_into()
        .map_err(|_| MlsError::BadRejoin("the KeyPackage's key is not an Ed25519 key"))?;
    verify_signature(
        &key,
        &transcript(group, epoch, leaf_key, package_bytes),
        &signature,
    )
    .map_err(|_| {
        MlsError::BadRejoin("its signature is not its KeyPackage owner's over this group and epoch")
    })?;
    Ok(RejoinRequest {
        group,
        epoch,
        leaf_key: leaf_key.to_vec(),
        package,
    })
}

#[cfg(test)]
mod tests {
    //! The request is hostile input to every member who reads it: every cut and every flipped
    //! byte is refused with an error, never a panic.
    use syncra_core::crypto::keys::IdentityKeyPair;

    use super::super::MlsIdentity;
    use super::*;

    #[test]
    fn every_prefix_and_every_flipped_byte_is_refused() {
        let identity = MlsIdentity::new(&IdentityKeyPair::generate());
        let conversation = identity.create_conversation().expect("create");
        let (id, epoch) = (conversation.id(), conversation.epoch());
        let request = identity.rejoin_request(&conversation).expect("request");
        let parsed = RejoinRequest::from_bytes(&request, id, epoch).expect("valid");
        assert_eq!(parsed.package.user_id(), identity.user_id());
        assert_eq!(Some(parsed.leaf_key), conversation.own_leaf_key());
        for cut in 0..request.len() {
            assert!(RejoinRequest::from_bytes(&request[..cut], id, epoch).is_err());
        }
        let mut longer = request.clone();
        longer.push(0);
        assert!(RejoinRequest::from_bytes(&longer, id, epoch).is_err());
        for i in 0..request.len() {
            let mut flipped = request.clone();
            flipped[i] ^= 0x01;
            assert!(
                RejoinRequest::from_bytes(&flipped, id, epoch).is_err(),
                "byte {i} flipped was accepted"
            );
        }
    }
}

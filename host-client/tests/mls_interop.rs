//! Conformance with a second MLS implementation: what Syncra's engine (openmls) produces is
//! accepted by mls-rs (AWS's implementation of RFC 9420), and the other way round.
//!
//! A member running mls-rs, whose credential is bound to its key the Syncra way (a basic
//! credential holding the user id of its Ed25519 signature key), publishes a KeyPackage; a
//! Syncra member checks it like any package from the directory, adds it, and the mls-rs member
//! joins from the Welcome and reads an application message. Then the mls-rs member answers,
//! commits an update, and the Syncra member processes both — the handshake path too.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use mls_rs::client_builder::PaddingMode;
use mls_rs::identity::SigningIdentity;
use mls_rs::identity::basic::{BasicCredential, BasicIdentityProvider};
use mls_rs::mls_rules::{DefaultMlsRules, EncryptionOptions};
use mls_rs::{CipherSuite, CipherSuiteProvider, CryptoProvider, MlsMessage};
use mls_rs_crypto_rustcrypto::RustCryptoProvider;
use syncra_client::mls::{CIPHERSUITE, Incoming, MemberKeyPackage, MlsIdentity, RosterEvent};
use syncra_core::UserId;
use syncra_core::crypto::keys::IdentityKeyPair;

/// mls-rs's name for the one suite Syncra speaks.
const SUITE: CipherSuite = CipherSuite::CURVE25519_AES128;

#[test]
fn mls_rs_joins_from_a_syncra_welcome_and_both_read_each_other() {
    assert_eq!(
        u16::from(CIPHERSUITE),
        u16::from(SUITE),
        "the same suite on both sides"
    );

    // The mls-rs member: an Ed25519 key from mls-rs's own provider, and the Syncra binding.
    let crypto = RustCryptoProvider::default();
    let suite = crypto.cipher_suite_provider(SUITE).unwrap();
    let (secret, public) = suite.signature_key_generate().unwrap();
    let public_key: [u8; 32] = public.as_bytes().try_into().unwrap();
    let bob_id = UserId::from_identity_key(&public_key);
    let credential = BasicCredential::new(bob_id.as_bytes().to_vec()).into_credential();
    let bob = mls_rs::Client::builder()
        .identity_provider(BasicIdentityProvider)
        .crypto_provider(crypto)
        .signing_identity(SigningIdentity::new(credential, public), secret, SUITE)
        // Handshakes as PrivateMessages, as Syncra requires (the relay sees no proposal).
        .mls_rules(
            DefaultMlsRules::new()
                .with_encryption_options(EncryptionOptions::new(true, PaddingMode::StepFunction)),
        )
        .build();
    let bob_package = bob
        .generate_key_package_message(Default::default(), Default::default(), None)
        .unwrap()
        .to_bytes()
        .unwrap();

    // The Syncra member checks the package as one from the directory, and adds Bob.
    let alice_key = IdentityKeyPair::generate();
    let alice = MlsIdentity::new(&alice_key);
    let package = MemberKeyPackage::from_bytes(&bob_package, bob_id).unwrap();
    let mut chat = alice.create_conversation().unwrap();
    let out = chat.add(&[package]).unwrap();
    chat.commit_accepted().unwrap();
    let welcome = MlsMessage::from_bytes(&out.welcome.unwrap()).unwrap();

    // mls-rs joins from the Syncra Welcome (tree in the ratchet_tree extension)...
    let (mut bob_group, _) = bob.join_group(None, &welcome, None).unwrap();
    assert_eq!(bob_group.current_epoch(), chat.epoch());
    assert_eq!(bob_group.group_id(), chat.id().as_bytes());

    // ...and reads an application message Syncra encrypted (a padded PrivateMessage).
    let hello = chat.encrypt(b"hello from openmls").unwrap();
    match bob_group
        .process_incoming_message(MlsMessage::from_bytes(&hello).unwrap())
        .unwrap()
    {
        mls_rs::group::ReceivedMessage::ApplicationMessage(m) => {
            assert_eq!(m.data(), b"hello from openmls");
        }
        other => panic!("expected an application message, got {other:?}"),
    }

    // The other way: Syncra reads mls-rs's message, with the sender bound to Bob's id.
    let reply = bob_group
        .encrypt_application_message(b"hello from mls-rs", Vec::new())
        .unwrap()
        .to_bytes()
        .unwrap();
    match chat.process(&reply).unwrap() {
        Incoming::Message {
            sender, plaintext, ..
        } => {
            assert_eq!(sender, bob_id);
            assert_eq!(&plaintext[..], b"hello from mls-rs");
        }
        other => panic!("expected a message, got {other:?}"),
    }

    // And a commit: Bob updates his leaf with mls-rs; Syncra checks the identity stays Bob's
    // and merges it.
    let commit = bob_group.commit(Vec::new()).unwrap();
    bob_group.apply_pending_commit().unwrap();
    match chat
        .process(&commit.commit_message.to_bytes().unwrap())
        .unwrap()
    {
        Incoming::Commit {
            by, events, epoch, ..
        } => {
            assert_eq!(by, bob_id);
            assert_eq!(events, vec![RosterEvent::Updated { member: bob_id }]);
            assert_eq!(epoch, bob_group.current_epoch());
        }
        other => panic!("expected a commit, got {other:?}"),
    }
    let after = chat.encrypt(b"after the update").unwrap();
    assert!(matches!(
        bob_group
            .process_incoming_message(MlsMessage::from_bytes(&after).unwrap())
            .unwrap(),
        mls_rs::group::ReceivedMessage::ApplicationMessage(_)
    ));
}

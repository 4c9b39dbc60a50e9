//! MLS conversations through a real relay (docs/PROTOCOL.md §9): clients that claim each
//! other's KeyPackages from the directory, commit through the relay's one-commit-per-epoch gate,
//! join from Welcomes and read what arrives in the relay's order — live or from the mailbox.
//!
//! Each test shows one of the properties the MLS conversations promise (docs/THREAT_MODEL.md):
//! a removed member cannot read what follows, a later member cannot read what came before, a
//! copied state stops decrypting after its owner's next update, two concurrent commits end with
//! one winner and everyone in the same epoch, an offline member catches up in order, and
//! tampered, replayed and out-of-epoch messages are refused with their own errors.
//!
//! Who holds an epoch's secrets is shown by the epoch's exporter ([`Conversation::export_secret`],
//! RFC 9420 §8.5), not by a refusal: a refusal may come from a check the client makes before
//! openmls decrypts anything (`NotAMember`, `FutureEpoch`), while two copies derive the same
//! exporter only if both hold the epoch's key schedule.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use std::sync::Arc;

use bytes::Bytes;
use syncra_client::mls::{
    Arrival, Conversation, ConversationId, Conversations, Incoming, MlsError, MlsIdentity,
    RosterEvent, ServiceError,
};
use syncra_client::net::{Dial, Login, NetError, Push, Session};
use syncra_core::UserId;
use syncra_core::wire::{ErrorCode, Outcome};
use syncra_test_relay::{TestRelay, TestUser};
use syncra_test_support::DEADLINE;
use tokio::sync::mpsc;

/// The exporter label the tests compare epochs by.
const LABEL: &str = "syncra test: who holds this epoch";

/// The exporter of `conv`'s current epoch: two copies agree on it exactly when both hold that
/// epoch's secrets.
fn exporter(conv: &Conversation) -> Result<Vec<u8>, MlsError> {
    conv.export_secret(LABEL, b"", 32).map(|s| s.to_vec())
}

/// One person with a live session and their conversations.
struct Member {
    user: TestUser,
    url: String,
    session: Arc<Session>,
    pushes: mpsc::Receiver<Push>,
    mls: Conversations,
}

impl Member {
    /// Registers at the relay, connects and stocks the KeyPackage directory.
    async fn join(relay: &TestRelay, name: &str) -> Member {
        let user = TestUser::new(name);
        drop(user.register(relay.url()).await);
        let (session, pushes) = connect(&user, relay.url()).await;
        let mls = Conversations::new(MlsIdentity::new(&user.identity));
        let mut member = Member {
            user,
            url: relay.url().to_owned(),
            session,
            pushes,
            mls,
        };
        let stock = member.mls.replenish(&member.session, 3).await.unwrap();
        assert_eq!(
            stock,
            (3, true),
            "three one-time packages and a last resort"
        );
        member
    }

    fn id(&self) -> UserId {
        self.user.id()
    }

    /// The next carriage delivered to this member (live or from the mailbox), as bytes.
    async fn next_raw(&mut self) -> Bytes {
        loop {
            let push = tokio::time::timeout(DEADLINE, self.pushes.recv())
                .await
                .expect("a delivery in time")
                .expect("the session is open");
            match push {
                Push::Deliver(bytes) => return bytes,
                Push::Pending(entry, bytes) => {
                    self.session.acknowledge(entry).await.unwrap();
                    return bytes;
                }
                Push::BacklogDone { .. } | Push::Notice(..) => {}
            }
        }
    }

    /// The next carriage, processed.
    async fn next(&mut self) -> Arrival {
        let bytes = self.next_raw().await;
        self.mls
            .receive(&bytes)
            .unwrap_or_else(|e| panic!("{} could not process a carriage: {e}", self.user.handle))
    }

    async fn expect_joined(&mut self) -> ConversationId {
        match self.next().await {
            Arrival::Joined { conversation, .. } => conversation,
            other => panic!("expected a Welcome, got {other:?}"),
        }
    }

    /// The next carriage is a commit whose declared member list (what the relay keeps) is
    /// the roster it made.
    async fn expect_commit(&mut self) -> (Vec<RosterEvent>, bool) {
        match self.next().await {
            Arrival::Commit {
                events,
                removed_me,
                misdeclared,
                ..
            } => {
                assert_eq!(misdeclared, None, "an honest commit declares its roster");
                (events, removed_me)
            }
            other => panic!("expected a commit, got {other:?}"),
        }
    }

    async fn expect_leave_request(&mut self, from: &Member) {
        match self.next().await {
            Arrival::LeaveRequest { member, .. } => assert_eq!(member, from.id()),
            other => panic!(
                "expected {}'s leave request, got {other:?}",
                from.user.handle
            ),
        }
    }

    async fn expect_message(&mut self, from: &Member, text: &str) {
        match self.next().await {
            Arrival::Message {
                sender, plaintext, ..
            } => {
                assert_eq!(sender, from.id(), "the sender MLS authenticated");
                assert_eq!(&plaintext[..], text.as_bytes());
            }
            other => panic!("expected {text:?} from {}, got {other:?}", from.user.handle),
        }
    }

    async fn say(&mut self, id: ConversationId, text: &str) -> Vec<Outcome> {
        self.mls
            .send(&self.session, id, text.as_bytes())
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.outcome)
            .collect()
    }

    fn epoch(&self, id: ConversationId) -> u64 {
        self.mls.get(id).unwrap().epoch()
    }

    /// The exporter of the epoch this member's copy of `id` is in.
    fn exporter(&self, id: ConversationId) -> Vec<u8> {
        exporter(self.mls.get(id).unwrap()).unwrap()
    }

    fn roster(&self, id: ConversationId) -> Vec<UserId> {
        let mut r = self.mls.get(id).unwrap().roster().unwrap();
        r.sort();
        r
    }
}

async fn connect(user: &TestUser, url: &str) -> (Arc<Session>, mpsc::Receiver<Push>) {
    let transport = syncra_client::net::transport(None).unwrap();
    let (tx, rx) = mpsc::channel(256);
    let session = Session::connect(
        &transport,
        Dial {
            url,
            relay_id: None,
            identity: &user.identity,
            insecure_plaintext: false,
            pushes_unread: false,
        },
        Login::Auth,
        None,
        tx,
    )
    .await
    .unwrap();
    (session, rx)
}

fn sorted(mut ids: Vec<UserId>) -> Vec<UserId> {
    ids.sort();
    ids
}

/// Alice creates a conversation with Bob and Carol; both join from the Welcome.
async fn group_of_three(
    alice: &mut Member,
    bob: &mut Member,
    carol: &mut Member,
) -> ConversationId {
    let g = alice
        .mls
        .create(&alice.session, &[bob.id(), carol.id()])
        .await
        .unwrap();
    bob.expect_joined().await;
    carol.expect_joined().await;
    g
}

/// Alice creates a 1:1 chat with Bob; he joins from the Welcome.
async fn chat_of_two(alice: &mut Member, bob: &mut Member) -> ConversationId {
    let chat = alice.mls.create(&alice.session, &[bob.id()]).await.unwrap();
    bob.expect_joined().await;
    chat
}

/// The MLS message inside a carriage.
fn body(carriage: &[u8]) -> Vec<u8> {
    syncra_core::carriage::parse(carriage)
        .unwrap()
        .body
        .to_vec()
}

#[tokio::test]
async fn a_one_to_one_chat_is_a_group_of_two_that_starts_with_its_first_message() {
    let relay = TestRelay::start(|_| {}).await;
    let mut alice = Member::join(&relay, "mr_alice").await;
    let mut bob = Member::join(&relay, "mr_bob").await;

    let chat = alice.mls.create(&alice.session, &[bob.id()]).await.unwrap();
    assert_eq!(alice.say(chat, "hello bob").await, vec![Outcome::Delivered]);
    // The Welcome and the first message travel the same ordered path: joined, then read.
    assert_eq!(bob.expect_joined().await, chat);
    bob.expect_message(&alice, "hello bob").await;
    assert_eq!(bob.say(chat, "hi alice").await, vec![Outcome::Delivered]);
    alice.expect_message(&bob, "hi alice").await;

    let both = sorted(vec![alice.id(), bob.id()]);
    assert_eq!(alice.roster(chat), both, "the roster is the membership");
    assert_eq!(bob.roster(chat), both);
    assert_eq!((alice.epoch(chat), bob.epoch(chat)), (1, 1));
    // Creating the chat used one of Bob's one-time KeyPackages.
    let (left, _) = bob
        .session
        .publish_key_packages(None, vec![])
        .await
        .unwrap();
    assert_eq!(left, 2);
}

#[tokio::test]
async fn a_removed_member_cannot_read_what_follows_and_a_later_one_cannot_read_what_came_before() {
    let relay = TestRelay::start(|_| {}).await;
    let mut alice = Member::join(&relay, "rm_alice").await;
    let mut bob = Member::join(&relay, "rm_bob").await;
    let mut carol = Member::join(&relay, "rm_carol").await;
    let mut dave = Member::join(&relay, "rm_dave").await;

    let g = group_of_three(&mut alice, &mut bob, &mut carol).await;
    alice.say(g, "before").await;
    let before = bob.next_raw().await;
    assert!(matches!(
        bob.mls.receive(&before),
        Ok(Arrival::Message { .. })
    ));
    carol.expect_message(&alice, "before").await;
    // Everyone holds the secrets of epoch 1, Carol too; a copy of her state keeps them (what
    // she would have if she ignored her removal).
    let epoch_1 = alice.exporter(g);
    assert_eq!(bob.exporter(g), epoch_1);
    assert_eq!(carol.exporter(g), epoch_1);
    let mut stale =
        Conversation::from_bytes(&carol.mls.get(g).unwrap().to_bytes(), carol.mls.identity())
            .unwrap();

    // Alice removes Carol: Carol learns it from the commit and is out.
    alice
        .mls
        .remove(&alice.session, g, &[carol.id()])
        .await
        .unwrap();
    let (events, removed_me) = carol.expect_commit().await;
    assert!(removed_me);
    assert_eq!(
        events,
        vec![RosterEvent::Removed {
            by: alice.id(),
            member: carol.id()
        }]
    );
    bob.expect_commit().await;
    // Alice and Bob derive the secrets of epoch 2 alike. Carol processed the commit and holds
    // none of them: its path secrets were encrypted to Alice and Bob only, so openmls merged
    // its public tree and no key schedule. Her earlier copy still holds epoch 1's.
    let epoch_2 = alice.exporter(g);
    assert_eq!(bob.exporter(g), epoch_2);
    assert_ne!(epoch_2, epoch_1);
    assert!(matches!(
        exporter(carol.mls.get(g).unwrap()),
        Err(MlsError::NotAMember)
    ));
    assert_eq!(exporter(&stale).unwrap(), epoch_1);

    // What follows goes to Bob only. Carol's client refuses it before openmls sees it (it
    // knows she is out); her earlier copy has not reached its epoch.
    assert_eq!(alice.say(g, "after carol").await, vec![Outcome::Delivered]);
    let after = bob.next_raw().await;
    assert!(matches!(
        bob.mls.receive(&after),
        Ok(Arrival::Message { .. })
    ));
    assert!(
        matches!(
            carol.mls.receive(&after),
            Err(ServiceError::Mls(MlsError::NotAMember))
        ),
        "a removed member's state must not open later messages"
    );
    assert!(matches!(
        stale.process(&body(&after)),
        Err(MlsError::FutureEpoch {
            message: 2,
            current: 1
        })
    ));
    // And Carol's client refuses to write to a conversation she is no longer in (the relay
    // would refuse it too: host-relay/tests/mls.rs).
    let refused = carol.mls.send(&carol.session, g, b"still here?").await;
    assert!(
        matches!(refused, Err(ServiceError::Mls(MlsError::NotAMember))),
        "{refused:?}"
    );

    // Dave joins later: he reads what comes next, not what came before.
    alice
        .mls
        .add(&alice.session, g, &[dave.id()])
        .await
        .unwrap();
    let add = bob.next_raw().await;
    assert!(matches!(
        bob.mls.receive(&add),
        Ok(Arrival::Commit {
            misdeclared: None,
            ..
        })
    ));
    // Carol's earlier copy cannot follow the next commit either: it is from epoch 2.
    assert!(matches!(
        stale.process(&body(&add)),
        Err(MlsError::FutureEpoch {
            message: 2,
            current: 1
        })
    ));
    assert_eq!(exporter(&stale).unwrap(), epoch_1);
    assert_eq!(dave.expect_joined().await, g);
    // The Welcome gives Dave the secrets of epoch 3, which the others derive too, and nothing
    // of the epochs before it: their exporters are not what he holds, and he keeps no state
    // for them to open their messages with.
    let epoch_3 = alice.exporter(g);
    assert_eq!(bob.exporter(g), epoch_3);
    assert_eq!(dave.exporter(g), epoch_3);
    assert_ne!(dave.exporter(g), epoch_1);
    assert_ne!(dave.exporter(g), epoch_2);
    alice.say(g, "welcome dave").await;
    dave.expect_message(&alice, "welcome dave").await;
    bob.expect_message(&alice, "welcome dave").await;
    for (what, old, epoch) in [("before", &before, 1), ("after carol", &after, 2)] {
        let err = dave.mls.receive(old).unwrap_err();
        assert!(
            matches!(
                err,
                ServiceError::Mls(MlsError::OldEpoch { message, current: 3 }) if message == epoch
            ),
            "a later member must not open {what:?}: {err:?}"
        );
    }
    assert_eq!(
        alice.roster(g),
        sorted(vec![alice.id(), bob.id(), dave.id()])
    );
}

#[tokio::test]
async fn a_copied_state_stops_decrypting_after_its_owners_next_update() {
    let relay = TestRelay::start(|_| {}).await;
    let mut alice = Member::join(&relay, "heal_alice").await;
    let mut bob = Member::join(&relay, "heal_bob").await;
    let chat = chat_of_two(&mut alice, &mut bob).await;

    // An attacker copies Bob's state (a stolen disk image) and reads along: it holds the
    // secrets of the epoch, as the members do.
    let stolen = bob.mls.get(chat).unwrap().to_bytes();
    let mut copy = Conversation::from_bytes(&stolen, bob.mls.identity()).unwrap();
    alice.say(chat, "read by the copy").await;
    let seen = bob.next_raw().await;
    assert!(matches!(
        bob.mls.receive(&seen),
        Ok(Arrival::Message { .. })
    ));
    match copy.process(&body(&seen)) {
        Ok(Incoming::Message { plaintext, .. }) => {
            assert_eq!(
                &plaintext[..],
                b"read by the copy",
                "before healing the copy reads"
            );
        }
        other => panic!("before healing the copy reads: {other:?}"),
    }
    let before_update = alice.exporter(chat);
    assert_eq!(exporter(&copy).unwrap(), before_update);

    // Bob updates his leaf through the relay; Alice processes it. The new path secret is
    // encrypted to Alice's leaf, not to the leaf the copy stole: the two members derive the
    // new epoch's secrets alike.
    bob.mls.update(&bob.session, chat).await.unwrap();
    let commit = alice.next_raw().await;
    match alice.mls.receive(&commit).unwrap() {
        Arrival::Commit { events, .. } => {
            assert_eq!(events, vec![RosterEvent::Updated { member: bob.id() }]);
        }
        other => panic!("expected Bob's update, got {other:?}"),
    }
    let healed = alice.exporter(chat);
    assert_eq!(bob.exporter(chat), healed);
    assert_ne!(healed, before_update);
    // The copy cannot get them. The update is the only commit it could process next, and
    // openmls does not open a message from its own leaf: to the copy it is its own message
    // echoed back. It is left with the secrets of the epoch before the update.
    let err = copy.process(&body(&commit)).unwrap_err();
    assert!(
        matches!(
            err,
            MlsError::Unsupported("this member's own message, echoed back")
        ),
        "{err:?}"
    );
    assert_eq!(exporter(&copy).unwrap(), before_update);
    assert_ne!(exporter(&copy).unwrap(), healed);
    alice.say(chat, "after the update").await;
    let after = bob.next_raw().await;
    assert!(matches!(
        bob.mls.receive(&after),
        Ok(Arrival::Message { .. })
    ));
    let err = copy.process(&body(&after)).unwrap_err();
    assert!(
        matches!(
            err,
            MlsError::FutureEpoch {
                message: 2,
                current: 1
            }
        ),
        "the copy cannot follow the update, so it reads nothing after it: {err:?}"
    );
}

#[tokio::test]
async fn of_two_concurrent_commits_one_wins_the_other_is_rebased_and_everyone_agrees() {
    let relay = TestRelay::start(|_| {}).await;
    let mut alice = Member::join(&relay, "cc_alice").await;
    let mut bob = Member::join(&relay, "cc_bob").await;
    let mut carol = Member::join(&relay, "cc_carol").await;
    let dave = Member::join(&relay, "cc_dave").await;
    let g = group_of_three(&mut alice, &mut bob, &mut carol).await;

    // Bob updates while Carol adds Dave, both in epoch 1.
    let add = [dave.id()];
    let (b, c) = tokio::join!(
        bob.mls.update(&bob.session, g),
        carol.mls.add(&carol.session, g, &add)
    );
    let (winner, loser) = match (b, c) {
        (Ok(_), Err(ServiceError::Conflict { epoch: 1, .. })) => (&mut bob, &mut carol),
        (Err(ServiceError::Conflict { epoch: 1, .. }), Ok(_)) => (&mut carol, &mut bob),
        other => panic!("exactly one commit must win epoch 1: {other:?}"),
    };
    // The loser gets the winner's commit and is told to rebase; it commits again on epoch 2.
    match loser.next().await {
        Arrival::Commit { rebase: true, .. } => {}
        other => panic!("the loser must be told to rebase: {other:?}"),
    }
    let rebased = loser.mls.rebase(&loser.session, g).await.unwrap();
    assert_eq!(rebased, Some(3));
    alice.expect_commit().await;
    alice.expect_commit().await;
    winner.expect_commit().await;
    let epochs: Vec<u64> = [&alice, &*winner, &*loser]
        .iter()
        .map(|m| m.epoch(g))
        .collect();
    assert_eq!(epochs, vec![3, 3, 3], "everyone ends in the same epoch");
    assert_eq!(alice.roster(g), winner.roster(g));
    assert_eq!(alice.roster(g), loser.roster(g));
    assert!(
        alice.roster(g).contains(&dave.id()),
        "the add happened, once"
    );
    // And the group still talks: the rebased member's message reaches everyone.
    loser.say(g, "rebased").await;
    alice.expect_message(loser, "rebased").await;
}

#[tokio::test]
async fn a_member_offline_across_several_commits_catches_up_in_order_from_the_mailbox() {
    let relay = TestRelay::start(|_| {}).await;
    let mut alice = Member::join(&relay, "off_alice").await;
    let mut bob = Member::join(&relay, "off_bob").await;
    let mut carol = Member::join(&relay, "off_carol").await;
    let dave = Member::join(&relay, "off_dave").await;
    let g = group_of_three(&mut alice, &mut bob, &mut carol).await;

    carol.session.close().await;
    carol.session.wait_closed().await;
    // Wait until the relay has seen Carol go: then what follows is stored for her.
    loop {
        let outcomes = alice.say(g, "are you there?").await;
        bob.next().await;
        if outcomes.contains(&Outcome::Stored) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    alice
        .mls
        .add(&alice.session, g, &[dave.id()])
        .await
        .unwrap();
    bob.expect_commit().await;
    alice.say(g, "dave is in").await;
    bob.mls.update(&bob.session, g).await.unwrap();
    alice.expect_commit().await;
    bob.say(g, "bob healed").await;
    alice
        .mls
        .remove(&alice.session, g, &[dave.id()])
        .await
        .unwrap();
    alice.say(g, "dave is out").await;

    // Carol logs in again: the backlog comes first, in order, and she follows every epoch.
    let (session, pushes) = connect(&carol.user, &carol.url).await;
    carol.session = session;
    carol.pushes = pushes;
    carol.expect_message(&alice, "are you there?").await;
    let (events, _) = carol.expect_commit().await;
    assert_eq!(
        events,
        vec![RosterEvent::Added {
            by: alice.id(),
            member: dave.id()
        }]
    );
    carol.expect_message(&alice, "dave is in").await;
    carol.expect_commit().await;
    carol.expect_message(&bob, "bob healed").await;
    carol.expect_commit().await;
    carol.expect_message(&alice, "dave is out").await;
    assert_eq!(carol.epoch(g), alice.epoch(g));
    assert_eq!(
        carol.roster(g),
        sorted(vec![alice.id(), bob.id(), carol.id()])
    );
}

#[tokio::test]
async fn tampered_replayed_mislabelled_and_out_of_epoch_messages_are_refused_by_name() {
    let relay = TestRelay::start(|_| {}).await;
    let mut alice = Member::join(&relay, "bad_alice").await;
    let mut bob = Member::join(&relay, "bad_bob").await;
    let chat = chat_of_two(&mut alice, &mut bob).await;

    alice.say(chat, "one").await;
    let one = bob.next_raw().await;
    // Tampered: one bit of the ciphertext flipped.
    let mut tampered = one.to_vec();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let err = bob.mls.receive(&tampered).unwrap_err();
    assert!(
        matches!(err, ServiceError::Mls(MlsError::Tampered)),
        "{err:?}"
    );
    // The real one still reads; then again, it is a replay.
    assert!(matches!(bob.mls.receive(&one), Ok(Arrival::Message { .. })));
    let err = bob.mls.receive(&one).unwrap_err();
    assert!(
        matches!(err, ServiceError::Mls(MlsError::Replayed)),
        "{err:?}"
    );

    // Mislabelled: an application message declared to the relay as a proposal.
    let mut parsed = syncra_core::carriage::parse(&one).unwrap().header;
    parsed.kind = syncra_core::carriage::CarriageKind::Proposal;
    let relabelled = parsed.encode(&body(&one));
    let err = bob.mls.receive(&relabelled).unwrap_err();
    assert!(matches!(err, ServiceError::Mismatch { .. }), "{err:?}");

    // Out of epoch: after Alice's update, a message of epoch 1 is refused, by the relay when
    // sent and by a member when it arrives anyway.
    alice.say(chat, "two").await;
    let two = bob.next_raw().await;
    alice.mls.update(&alice.session, chat).await.unwrap();
    bob.expect_commit().await;
    let err = bob.mls.receive(&two).unwrap_err();
    assert!(
        matches!(
            err,
            ServiceError::Mls(MlsError::OldEpoch {
                message: 1,
                current: 2
            })
        ),
        "{err:?}"
    );
    let stale = alice.session.send(two.to_vec()).await.unwrap_err();
    assert!(
        matches!(
            stale,
            NetError::Refused {
                code: ErrorCode::WrongEpoch,
                ..
            }
        ),
        "{stale:?}"
    );
    // Bob is still fine.
    alice.say(chat, "three").await;
    bob.expect_message(&alice, "three").await;
}

#[tokio::test]
async fn conversations_are_sealed_at_rest_and_pick_up_where_they_left_off() {
    use syncra_core::crypto::local_box::LocalKey;
    let relay = TestRelay::start(|_| {}).await;
    let mut alice = Member::join(&relay, "rest_alice").await;
    let mut bob = Member::join(&relay, "rest_bob").await;
    let chat = chat_of_two(&mut alice, &mut bob).await;
    alice.say(chat, "before the restart").await;
    bob.expect_message(&alice, "before the restart").await;

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("mls");
    let key = LocalKey::generate();
    bob.mls.save(&state, &key).unwrap();
    // Nothing readable on disk: no plaintext, no key material in the clear, files 0600.
    for entry in std::fs::read_dir(&state).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        assert!(!bytes.windows(6).any(|w| w == b"before"), "{path:?}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{path:?}");
    }
    // A restart: the state comes back and reads what follows.
    bob.mls = Conversations::load(&bob.user.identity, &state, &key).unwrap();
    assert_eq!(bob.epoch(chat), 1);
    alice.say(chat, "after the restart").await;
    bob.expect_message(&alice, "after the restart").await;
    assert_eq!(bob.say(chat, "still me").await, vec![Outcome::Delivered]);
    alice.expect_message(&bob, "still me").await;

    // Another key, or a conversation's file under another name, is refused by name.
    let err = Conversations::load(&bob.user.identity, &state, &LocalKey::generate()).unwrap_err();
    assert!(err.to_string().contains("damaged"), "{err}");
    let file = state.join(format!("{chat}.state"));
    let moved = state.join("aaaaaaaaaaaaaaaaaaaaaaaaaa.state");
    std::fs::rename(&file, &moved).unwrap();
    let err = Conversations::load(&bob.user.identity, &state, &key).unwrap_err();
    assert!(err.to_string().contains("aaaaaaaa"), "{err}");
}

/// A relay node of a two-node cluster: the shared Postgres holds the directory and the group
/// epochs, NATS carries deliveries between the nodes.
async fn cluster_node(pg: &str, nats: &str, key: &std::path::Path) -> TestRelay {
    let (pg, nats, key) = (pg.to_owned(), nats.to_owned(), key.to_path_buf());
    TestRelay::start(move |c| {
        c.store = serde_json::json!({ "kind": "postgres", "url": pg });
        c.mailbox = serde_json::json!({ "kind": "postgres", "url": pg });
        c.broker = serde_json::json!({ "kind": "nats", "url": nats });
        c.auth.token_key_file = key;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_two_node_cluster_one_commit_wins_each_epoch_and_everyone_agrees() {
    use syncra_test_support::postgres::PostgresServer;
    use syncra_test_support::servers::NatsServer;
    let pg = PostgresServer::start();
    let nats = NatsServer::start();
    let shared = tempfile::tempdir().unwrap();
    let key = shared.path().join("token.key");
    let n1 = cluster_node(&pg.url(), &nats.url(), &key).await;
    let n2 = cluster_node(&pg.url(), &nats.url(), &key).await;
    let mut alice = Member::join(&n1, "cl_alice").await;
    let mut bob = Member::join(&n1, "cl_bob").await;
    let mut carol = Member::join(&n2, "cl_carol").await;

    // A 1:1 chat across the nodes: the Welcome and the first message cross the broker.
    let chat = alice
        .mls
        .create(&alice.session, &[carol.id()])
        .await
        .unwrap();
    alice.say(chat, "across nodes").await;
    carol.expect_joined().await;
    carol.expect_message(&alice, "across nodes").await;

    let g = group_of_three(&mut alice, &mut bob, &mut carol).await;
    // Bob (node 1) and Carol (node 2) commit in the same epoch: the store decides, once.
    let (b, c) = tokio::join!(
        bob.mls.update(&bob.session, g),
        carol.mls.update(&carol.session, g)
    );
    let (winner, loser) = match (b, c) {
        (Ok(_), Err(ServiceError::Conflict { .. })) => (&mut bob, &mut carol),
        (Err(ServiceError::Conflict { .. }), Ok(_)) => (&mut carol, &mut bob),
        other => panic!("exactly one commit must win the epoch across nodes: {other:?}"),
    };
    match loser.next().await {
        Arrival::Commit { rebase: true, .. } => {}
        other => panic!("the loser must be told to rebase: {other:?}"),
    }
    assert_eq!(loser.mls.rebase(&loser.session, g).await.unwrap(), Some(3));
    alice.expect_commit().await;
    alice.expect_commit().await;
    winner.expect_commit().await;
    assert_eq!(
        (alice.epoch(g), winner.epoch(g), loser.epoch(g)),
        (3, 3, 3),
        "everyone ends in the same epoch"
    );
    winner.say(g, "agreed").await;
    alice.expect_message(winner, "agreed").await;
    loser.expect_message(winner, "agreed").await;
}

#[tokio::test]
async fn leaves_are_refreshed_on_a_schedule_and_all_at_once_after_a_rotation() {
    use syncra_client::mls::LEAF_UPDATE_INTERVAL_MS;
    let relay = TestRelay::start(|_| {}).await;
    let mut alice = Member::join(&relay, "sched_alice").await;
    let mut bob = Member::join(&relay, "sched_bob").await;
    let chat = chat_of_two(&mut alice, &mut bob).await;
    let now = syncra_core::now_ms();
    assert!(
        bob.mls.updates_due(now, LEAF_UPDATE_INTERVAL_MS).is_empty(),
        "a leaf from a fresh KeyPackage is not due"
    );
    // A day later Bob's leaf is due; refreshing it is an update commit Alice sees.
    let later = now + LEAF_UPDATE_INTERVAL_MS;
    assert_eq!(
        bob.mls.updates_due(later, LEAF_UPDATE_INTERVAL_MS),
        vec![chat]
    );
    let done = bob
        .mls
        .update_due(&bob.session, later, LEAF_UPDATE_INTERVAL_MS)
        .await;
    assert!(matches!(done[..], [(id, Ok(2))] if id == chat), "{done:?}");
    let (events, _) = alice.expect_commit().await;
    assert_eq!(events, vec![RosterEvent::Updated { member: bob.id() }]);
    assert!(
        bob.mls
            .updates_due(later, LEAF_UPDATE_INTERVAL_MS)
            .is_empty()
    );

    // The schedule survives a restart (it is sealed with the state).
    let dir = tempfile::tempdir().unwrap();
    let key = syncra_core::crypto::local_box::LocalKey::generate();
    bob.mls.save(dir.path(), &key).unwrap();
    bob.mls = Conversations::load(&bob.user.identity, dir.path(), &key).unwrap();
    assert!(
        bob.mls
            .updates_due(later, LEAF_UPDATE_INTERVAL_MS)
            .is_empty()
    );

    // After a key rotation every conversation is due at once.
    bob.mls.all_due();
    assert_eq!(
        bob.mls.updates_due(later, LEAF_UPDATE_INTERVAL_MS),
        vec![chat]
    );
    bob.mls
        .update_due(&bob.session, later, LEAF_UPDATE_INTERVAL_MS)
        .await;
    alice.expect_commit().await;
    assert_eq!((alice.epoch(chat), bob.epoch(chat)), (3, 3));
}

#[tokio::test]
async fn a_member_leaves_through_a_proposal_that_another_member_commits() {
    let relay = TestRelay::start(|_| {}).await;
    let mut alice = Member::join(&relay, "lv_alice").await;
    let mut bob = Member::join(&relay, "lv_bob").await;
    let mut carol = Member::join(&relay, "lv_carol").await;
    let g = group_of_three(&mut alice, &mut bob, &mut carol).await;

    // Carol asks to leave; she cannot commit her own departure.
    carol.mls.leave(&carol.session, g).await.unwrap();
    alice.expect_leave_request(&carol).await;
    bob.expect_leave_request(&carol).await;
    // Alice commits it: Carol learns she is out, Bob sees who removed whom.
    assert_eq!(
        alice
            .mls
            .commit_departures(&alice.session, g)
            .await
            .unwrap(),
        2
    );
    let (_, removed_me) = carol.expect_commit().await;
    assert!(removed_me);
    let (events, _) = bob.expect_commit().await;
    assert_eq!(
        events,
        vec![RosterEvent::Removed {
            by: alice.id(),
            member: carol.id()
        }]
    );
    let both = sorted(vec![alice.id(), bob.id()]);
    assert_eq!((alice.roster(g), bob.roster(g)), (both.clone(), both));
    // What follows is for Alice and Bob only.
    assert_eq!(alice.say(g, "just us").await, vec![Outcome::Delivered]);
    bob.expect_message(&alice, "just us").await;
    // Nothing is left to commit.
    assert!(matches!(
        alice.mls.commit_departures(&alice.session, g).await,
        Err(ServiceError::Mls(MlsError::NothingToDo(_)))
    ));
}

/// A commit carries every leave request queued when it was made, also beside an addition: the
/// member list given to the relay is the roster the commit makes, so the one who left is out of
/// the relay's list too and can no longer send to the group (before, an addition declared the
/// old roster plus the newcomer, and the relay kept taking the leaver's carriages).
#[tokio::test]
async fn a_leave_request_committed_beside_an_addition_leaves_the_relay_s_list_too() {
    let relay = TestRelay::start(|_| {}).await;
    let mut alice = Member::join(&relay, "la_alice").await;
    let mut bob = Member::join(&relay, "la_bob").await;
    let mut carol = Member::join(&relay, "la_carol").await;
    let mut dave = Member::join(&relay, "la_dave").await;
    let g = group_of_three(&mut alice, &mut bob, &mut carol).await;

    carol.mls.leave(&carol.session, g).await.unwrap();
    alice.expect_leave_request(&carol).await;
    bob.expect_leave_request(&carol).await;
    // Alice adds Dave; her commit carries Carol's queued departure with it.
    alice
        .mls
        .add(&alice.session, g, &[dave.id()])
        .await
        .unwrap();
    dave.expect_joined().await;
    let (_, removed_me) = carol.expect_commit().await;
    assert!(
        removed_me,
        "the addition's commit took Carol's leave request"
    );
    let (events, _) = bob.expect_commit().await;
    assert!(
        events.contains(&RosterEvent::Removed {
            by: alice.id(),
            member: carol.id()
        }),
        "{events:?}"
    );
    let three = sorted(vec![alice.id(), bob.id(), dave.id()]);
    assert_eq!(bob.roster(g), three);

    // Carol is out of the relay's list as well: a carriage from her is refused.
    let header = syncra_core::carriage::CarriageHeader {
        message_id: [7; 16],
        kind: syncra_core::carriage::CarriageKind::Application,
        group_id: syncra_core::carriage::GroupId(*g.as_bytes()),
        epoch: alice.epoch(g),
        recipients: vec![alice.id()],
        members: Vec::new(),
    };
    let refused = carol
        .session
        .send(header.encode(b"still here?"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused,
            NetError::Refused {
                code: ErrorCode::NotAMember,
                ..
            }
        ),
        "{refused:?}"
    );
}

/// The member list beside a commit is its author's word, unsigned; the relay decides by it who
/// may send to the group. A list that is not the roster the commit made is reported with the
/// commit (the client names its author in the group's history), whoever changed it.
#[tokio::test]
async fn a_commit_whose_member_list_is_not_its_roster_is_reported() {
    let relay = TestRelay::start(|_| {}).await;
    let mut alice = Member::join(&relay, "md_alice").await;
    let mut bob = Member::join(&relay, "md_bob").await;
    let mut carol = Member::join(&relay, "md_carol").await;
    let outsider = TestUser::new("md_mallory");
    let g = group_of_three(&mut alice, &mut bob, &mut carol).await;

    alice.mls.update(&alice.session, g).await.unwrap();
    carol.expect_commit().await;
    let commit = bob.next_raw().await;
    let mut header = syncra_core::carriage::parse(&commit).unwrap().header;
    let honest = header.members.clone();
    assert_eq!(sorted(honest.clone()), bob.roster(g));
    // Bob left out, an outsider let in.
    header.members = vec![alice.id(), carol.id(), outsider.id()];
    let relabelled = header.encode(&body(&commit));
    match bob.mls.receive(&relabelled).unwrap() {
        Arrival::Commit {
            by, misdeclared, ..
        } => {
            assert_eq!(by, alice.id());
            assert_eq!(
                misdeclared,
                Some(vec![alice.id(), carol.id(), outsider.id()])
            );
        }
        other => panic!("expected the commit, got {other:?}"),
    }
    assert_eq!(
        bob.epoch(g),
        alice.epoch(g),
        "the commit itself is processed"
    );
}

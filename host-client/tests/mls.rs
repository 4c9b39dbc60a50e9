//! The MLS engine's security properties, in process (no relay yet): who can read what after
//! adds, removes and updates; one commit per epoch and the rebase of the loser; refusals of
//! tampered, replayed and out-of-epoch messages; catching up after being offline; state that
//! survives a round trip through bytes.
//!
//! A small `Net` stands in for the relay: it decides which commit wins an epoch and hands every
//! member the same messages in the same order.
//!
//! Who holds an epoch's secrets is shown by the epoch's exporter ([`Conversation::export_secret`],
//! RFC 9420 §8.5), not by a refusal: a refusal may come from a check the wrapper makes before
//! openmls decrypts anything (`NotAMember`, `FutureEpoch`), while two copies derive the same
//! exporter only if both hold the epoch's key schedule.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use syncra_client::mls::{
    Conversation, Incoming, Intent, MemberKeyPackage, MlsError, MlsIdentity, PAST_EPOCHS_KEPT,
    RejoinRequest, RosterEvent,
};
use syncra_core::crypto::keys::IdentityKeyPair;
use syncra_core::id::UserId;

/// The exporter label the tests compare epochs by.
const LABEL: &str = "syncra test: who holds this epoch";

/// The exporter of `conv`'s current epoch: two copies agree on it exactly when both hold that
/// epoch's secrets.
fn exporter(conv: &Conversation) -> Result<Vec<u8>, MlsError> {
    conv.export_secret(LABEL, b"", 32).map(|s| s.to_vec())
}

/// One person: the identity and, once in, their conversation.
struct Person {
    key: IdentityKeyPair,
    mls: MlsIdentity,
    conv: Option<Conversation>,
}

impl Person {
    fn new() -> Self {
        let key = IdentityKeyPair::generate();
        let mls = MlsIdentity::new(&key);
        Person {
            key,
            mls,
            conv: None,
        }
    }

    fn id(&self) -> UserId {
        self.key.user_id()
    }

    /// A one-time KeyPackage as an adder gets it from the directory.
    fn key_package(&self) -> MemberKeyPackage {
        let out = self.mls.key_package().unwrap();
        MemberKeyPackage::from_bytes(&out.bytes, self.id()).unwrap()
    }

    fn conv(&mut self) -> &mut Conversation {
        self.conv.as_mut().expect("in the conversation")
    }

    fn join(&mut self, welcome: &[u8]) {
        self.conv = Some(self.mls.join(welcome).unwrap());
    }

    fn send(&mut self, text: &str) -> Vec<u8> {
        self.conv().encrypt(text.as_bytes()).unwrap()
    }

    /// Opens an application message and checks who sent it and what it says.
    fn read(&mut self, bytes: &[u8], from: UserId, text: &str) {
        match self.conv().process(bytes).unwrap() {
            Incoming::Message {
                sender, plaintext, ..
            } => {
                assert_eq!(sender, from);
                assert_eq!(&plaintext[..], text.as_bytes());
            }
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// Processes a commit and returns what it reported.
    fn apply(&mut self, bytes: &[u8]) -> Incoming {
        self.conv().process(bytes).unwrap()
    }

    fn refuse(&mut self, bytes: &[u8]) -> MlsError {
        self.conv().process(bytes).unwrap_err()
    }

    /// The exporter of the epoch this member is in.
    fn exporter(&mut self) -> Vec<u8> {
        exporter(self.conv()).unwrap()
    }

    /// A request to be let back in: the conversation, the epoch this copy is in, the bytes.
    fn rejoin_request(&mut self) -> (syncra_client::mls::ConversationId, u64, Vec<u8>) {
        let conv = self.conv.as_ref().expect("in the conversation");
        let request = self.mls.rejoin_request(conv).unwrap();
        (conv.id(), conv.epoch(), request)
    }
}

/// Alice (`people[0]`) updates her leaf; everyone processes the commit but bob (`people[1]`),
/// who never gets it.
fn bob_misses_a_commit(people: &mut [Person]) {
    let out = people[0].conv().update().unwrap();
    people[0].conv().commit_accepted().unwrap();
    for p in &mut people[2..] {
        p.apply(&out.commit);
    }
}

/// Makes a group: `people[0]` creates it and adds all the others in one commit; then every
/// member updates its leaf once (what members do on a schedule), so the tree is the realistic
/// filled one rather than the sparse one of a fresh group.
fn group(n: usize) -> Vec<Person> {
    let mut people: Vec<Person> = (0..n).map(|_| Person::new()).collect();
    people[0].conv = Some(people[0].mls.create_conversation().unwrap());
    if n > 1 {
        let packages: Vec<MemberKeyPackage> = people[1..].iter().map(Person::key_package).collect();
        let out = people[0].conv().add(&packages).unwrap();
        people[0].conv().commit_accepted().unwrap();
        let welcome = out.welcome.unwrap();
        for p in &mut people[1..] {
            p.join(&welcome);
        }
    }
    for i in 1..n {
        let out = people[i].conv().update().unwrap();
        deliver_commit(&mut people, i, &out.commit);
    }
    people
}

/// The relay accepted `author`'s commit: the author merges it, everyone else processes it.
fn deliver_commit(people: &mut [Person], author: usize, commit: &[u8]) {
    people[author].conv().commit_accepted().unwrap();
    for (i, p) in people.iter_mut().enumerate() {
        if i != author && p.conv.as_ref().is_some_and(Conversation::is_active) {
            match p.apply(commit) {
                Incoming::Commit { .. } => {}
                other => panic!("expected a commit, got {other:?}"),
            }
        }
    }
}

/// Everyone is in the same epoch with the same roster, and holds that epoch's secrets.
fn assert_agree(people: &mut [Person]) {
    let epoch = people[0].conv().epoch();
    let roster = people[0].conv().roster().unwrap();
    let secret = people[0].exporter();
    for p in people.iter_mut() {
        assert_eq!(p.conv().epoch(), epoch);
        assert_eq!(p.conv().roster().unwrap(), roster);
        assert_eq!(p.exporter(), secret);
    }
}

#[test]
fn a_one_to_one_chat_is_a_group_of_two_and_both_read_each_other() {
    let mut alice = Person::new();
    let mut bob = Person::new();
    alice.conv = Some(alice.mls.create_conversation().unwrap());
    let out = alice.conv().add(&[bob.key_package()]).unwrap();
    assert_eq!(out.epoch, 0);
    // The Welcome and the first message travel together: the message is encrypted in the
    // epoch the Welcome brings bob into.
    assert_eq!(alice.conv().commit_accepted().unwrap(), 1);
    let first = alice.send("hi bob");
    bob.join(out.welcome.as_deref().unwrap());
    bob.read(&first, alice.id(), "hi bob");
    let reply = bob.send("hi alice");
    alice.read(&reply, bob.id(), "hi alice");

    assert_eq!(alice.conv().roster().unwrap(), vec![alice.id(), bob.id()]);
    assert_eq!(bob.conv().roster().unwrap(), vec![alice.id(), bob.id()]);
    assert_eq!(alice.conv().id(), bob.conv().id());
    assert_eq!(bob.conv().epoch(), 1);
}

#[test]
fn a_commit_reports_the_roster_change_as_events() {
    let mut people = group(3);
    let eve = Person::new();
    let (alice, bob, carol) = (people[0].id(), people[1].id(), people[2].id());
    let out = people[0].conv().add(&[eve.key_package()]).unwrap();
    people[0].conv().commit_accepted().unwrap();
    match people[1].apply(&out.commit) {
        Incoming::Commit {
            by,
            events,
            removed_me,
            discarded,
            ..
        } => {
            assert_eq!(by, alice);
            assert_eq!(
                events,
                vec![RosterEvent::Added {
                    by: alice,
                    member: eve.id()
                }]
            );
            assert_eq!(events[0].to_string(), format!("{alice} added {}", eve.id()));
            assert!(!removed_me);
            assert!(discarded.is_none());
        }
        other => panic!("{other:?}"),
    }
    people[2].apply(&out.commit);

    let out = people[1].conv().remove(&[carol]).unwrap();
    people[1].conv().commit_accepted().unwrap();
    people[0].apply(&out.commit);
    match people[2].apply(&out.commit) {
        Incoming::Commit {
            events, removed_me, ..
        } => {
            assert_eq!(
                events,
                vec![RosterEvent::Removed {
                    by: bob,
                    member: carol
                }]
            );
            assert!(removed_me);
        }
        other => panic!("{other:?}"),
    }
    assert!(!people[2].conv().is_active());

    let out = people[1].conv().update().unwrap();
    people[1].conv().commit_accepted().unwrap();
    match people[0].apply(&out.commit) {
        Incoming::Commit { events, .. } => {
            assert_eq!(events, vec![RosterEvent::Updated { member: bob }]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        people[0].conv().roster().unwrap(),
        vec![alice, bob, eve.id()]
    );
}

#[test]
fn a_removed_member_cannot_read_what_follows() {
    let mut people = group(3);
    let carol = people[2].id();
    // A copy of carol's state from before the removal: what she would have if she ignored it.
    // It holds the secrets of epoch 3, as everyone does.
    let mut stale = Conversation::from_bytes(&people[2].conv().to_bytes(), &people[2].mls).unwrap();
    let epoch_3 = people[0].exporter();
    assert_eq!(exporter(&stale).unwrap(), epoch_3);

    let removal = people[0].conv().remove(&[carol]).unwrap();
    deliver_commit(&mut people, 0, &removal.commit);
    assert!(!people[2].conv().is_active());
    // Alice and bob derive the secrets of epoch 4 alike; they are new.
    let epoch_4 = people[0].exporter();
    assert_eq!(people[1].exporter(), epoch_4);
    assert_ne!(epoch_4, epoch_3);
    // Carol processed the removal, the one commit she could, and came out without them: the
    // commit's path secrets were encrypted to alice and bob only, so openmls merged its public
    // tree and no key schedule.
    assert!(matches!(
        exporter(people[2].conv()),
        Err(MlsError::NotAMember)
    ));

    let secret = people[0].send("carol must not read this");
    let from = people[0].id();
    people[1].read(&secret, from, "carol must not read this");
    // (Refused before openmls sees it: her copy knows it is out. What shows she cannot read
    // it is the exporter above.)
    assert!(matches!(people[2].refuse(&secret), MlsError::NotAMember));

    // Her earlier state holds epoch 3's secrets, not epoch 4's, and cannot get there: every
    // later message and commit is from an epoch it has not reached...
    let out = people[1].conv().update().unwrap();
    deliver_commit(&mut people, 1, &out.commit);
    let epoch_5 = people[0].exporter();
    assert_eq!(people[1].exporter(), epoch_5);
    for bytes in [&secret, &out.commit] {
        assert!(matches!(
            stale.process(bytes),
            Err(MlsError::FutureEpoch {
                message: 4,
                current: 3
            })
        ));
    }
    assert_eq!(exporter(&stale).unwrap(), epoch_3);
    // ...and the one commit it can process, the removal, ends it as it ended carol.
    match stale.process(&removal.commit).unwrap() {
        Incoming::Commit {
            removed_me, epoch, ..
        } => assert!(removed_me && epoch == 4),
        other => panic!("{other:?}"),
    }
    assert!(matches!(exporter(&stale), Err(MlsError::NotAMember)));
    // And she cannot commit or send any more.
    assert!(matches!(
        people[2].conv().encrypt(b"x"),
        Err(MlsError::NotAMember)
    ));
    assert!(matches!(
        people[2].conv().update(),
        Err(MlsError::NotAMember)
    ));
}

#[test]
fn a_member_added_later_cannot_read_what_came_before() {
    let mut people = group(2);
    let before = people[0].send("before dave");
    let from = people[0].id();
    people[1].read(&before, from, "before dave");
    // The secrets of the epoch "before dave" was sent in, as its members derive them.
    let epoch_before = people[1].conv().epoch();
    let secret_before = people[1].exporter();
    assert_eq!(people[0].exporter(), secret_before);

    let mut dave = Person::new();
    let out = people[0].conv().add(&[dave.key_package()]).unwrap();
    deliver_commit(&mut people, 0, &out.commit);
    dave.join(out.welcome.as_deref().unwrap());

    // The Welcome gives dave the secrets of the epoch the add began: he derives what the
    // others derive...
    let joined = people[0].exporter();
    assert_eq!(people[1].exporter(), joined);
    assert_eq!(dave.exporter(), joined);
    assert_eq!(dave.conv().epoch(), epoch_before + 1);
    // ...and nothing of the epoch before: its exporter is not what he holds, and he keeps no
    // state for that epoch to open its messages with.
    assert_ne!(dave.exporter(), secret_before);
    match dave.refuse(&before) {
        MlsError::OldEpoch { message, current } => {
            assert_eq!(message, epoch_before);
            assert_eq!(current, epoch_before + 1);
        }
        other => panic!("{other:?}"),
    }
    let after = people[0].send("welcome dave");
    dave.read(&after, people[0].id(), "welcome dave");
}

#[test]
fn a_copied_state_stops_decrypting_after_its_owner_updates() {
    let mut people = group(3);
    let bob = people[1].id();
    // The attacker copies bob's whole state (what a stolen disk and passphrase would give).
    let mut attacker =
        Conversation::from_bytes(&people[1].conv().to_bytes(), &people[1].mls).unwrap();
    let m1 = people[0].send("one");
    let from = people[0].id();
    people[1].read(&m1, from, "one");
    // The compromise is real: the copy reads the group's traffic...
    assert!(matches!(
        attacker.process(&m1),
        Ok(Incoming::Message { .. })
    ));

    // ...and keeps up with other members' commits, which encrypt to bob's leaf, whose keys
    // it holds: it derives the secrets of the epoch they make, as the members do.
    let out = people[2].conv().update().unwrap();
    deliver_commit(&mut people, 2, &out.commit);
    assert!(matches!(
        attacker.process(&out.commit),
        Ok(Incoming::Commit { .. })
    ));
    let before_update = people[0].exporter();
    assert_eq!(exporter(&attacker).unwrap(), before_update);
    let m2 = people[0].send("two");
    assert!(matches!(
        attacker.process(&m2),
        Ok(Incoming::Message { .. })
    ));
    let from = people[0].id();
    people[1].read(&m2, from, "two");

    // Bob updates: fresh leaf keys the copy never saw, and the new path secrets are
    // encrypted to alice's and carol's subtrees, not to anything the copy holds. The members
    // agree on the secrets of the new epoch.
    let out = people[1].conv().update().unwrap();
    deliver_commit(&mut people, 1, &out.commit);
    let healed = people[0].exporter();
    assert_eq!(people[1].exporter(), healed);
    assert_eq!(people[2].exporter(), healed);
    assert_ne!(healed, before_update);
    // The copy cannot get them. The update is the only commit it could process next, and
    // openmls does not open a message from its own leaf: to the copy it is its own message
    // echoed back.
    assert!(matches!(
        attacker.process(&out.commit),
        Err(MlsError::Unsupported(
            "this member's own message, echoed back"
        ))
    ));
    // It is left with the secrets of the epoch before the update, not those after it.
    assert_eq!(exporter(&attacker).unwrap(), before_update);
    assert_ne!(exporter(&attacker).unwrap(), healed);

    let m3 = people[0].send("three");
    let from = people[0].id();
    people[1].read(&m3, from, "three");
    let from = people[0].id();
    people[2].read(&m3, from, "three");
    let m4 = people[1].send("four");
    people[0].read(&m4, bob, "four");
    // Everything after the update is from an epoch the copy has not reached.
    for m in [&m3, &m4] {
        assert!(matches!(
            attacker.process(m),
            Err(MlsError::FutureEpoch {
                message: 5,
                current: 4
            })
        ));
    }
}

#[test]
fn two_commits_on_one_epoch_only_one_wins_and_the_loser_rebases() {
    let mut people = group(4);
    let eve_person = Person::new();
    let (alice, bob, dave) = (people[0].id(), people[1].id(), people[3].id());
    let epoch = people[0].conv().epoch();

    // Alice adds eve and bob removes dave, both on the same epoch.
    let a = people[0].conv().add(&[eve_person.key_package()]).unwrap();
    let b = people[1].conv().remove(&[dave]).unwrap();
    assert_eq!(a.epoch, epoch);
    assert_eq!(b.epoch, epoch);
    // While its commit is pending a member makes no second one.
    assert!(matches!(
        people[1].conv().update(),
        Err(MlsError::CommitPending)
    ));

    // The relay accepts alice's commit (the first for the epoch). Carol and dave merge it;
    // bob's commit arriving after it lost and is refused by its own kind.
    people[0].conv().commit_accepted().unwrap();
    people[2].apply(&a.commit);
    people[3].apply(&a.commit);
    match people[2].refuse(&b.commit) {
        MlsError::CommitLost {
            commit_epoch,
            current,
        } => {
            assert_eq!(commit_epoch, epoch);
            assert_eq!(current, epoch + 1);
        }
        other => panic!("{other:?}"),
    }

    // Bob processes the winner: his own commit is discarded and handed back to retry.
    let intent = match people[1].apply(&a.commit) {
        Incoming::Commit { by, discarded, .. } => {
            assert_eq!(by, alice);
            discarded.expect("bob's commit was pending")
        }
        other => panic!("{other:?}"),
    };
    assert!(matches!(&intent, Intent::Remove(users) if users == &vec![dave]));
    assert!(people[1].conv().pending_intent().is_none());
    let retried = people[1]
        .conv()
        .retry(intent)
        .unwrap()
        .expect("dave is still in");
    assert_eq!(retried.epoch, epoch + 1);

    let mut eve = eve_person;
    eve.join(a.welcome.as_deref().unwrap());
    people.push(eve);
    deliver_commit(&mut people, 1, &retried.commit);
    assert!(!people[3].conv().is_active());
    let dave_person = people.remove(3);
    assert_eq!(dave_person.id(), dave);

    assert_agree(&mut people);
    assert_eq!(people[0].conv().epoch(), epoch + 2);
    let roster = people[0].conv().roster().unwrap();
    assert!(roster.contains(&bob) && !roster.contains(&dave) && roster.len() == 4);
    // Alice, bob, carol and eve remain.
    let eve = people[3].id();
    let m = people[3].send("eve here");
    for p in &mut people[..3] {
        p.read(&m, eve, "eve here");
    }
}

#[test]
fn a_commit_refused_by_the_relay_is_dropped_then_retried_on_the_winner() {
    let mut people = group(3);
    let a = people[0].conv().update().unwrap();
    let b = people[1].conv().update().unwrap();
    // The relay refuses bob's: he drops it first, then processes alice's, then retries.
    let intent = people[1].conv().commit_rejected().unwrap();
    assert!(matches!(intent, Intent::Update));
    assert!(matches!(
        people[1].conv().commit_rejected(),
        Err(MlsError::NoPendingCommit)
    ));
    deliver_commit(&mut people, 0, &a.commit);
    assert!(matches!(
        people[2].refuse(&b.commit),
        MlsError::CommitLost { .. }
    ));
    let again = people[1].conv().retry(intent).unwrap().unwrap();
    deliver_commit(&mut people, 1, &again.commit);
    assert_agree(&mut people);

    // A retried add whose members the winner already added has nothing left to do.
    let eve = Person::new();
    let kp = eve.key_package();
    let a = people[0].conv().add(std::slice::from_ref(&kp)).unwrap();
    deliver_commit(&mut people, 0, &a.commit);
    assert!(
        people[2]
            .conv()
            .retry(Intent::Add(vec![kp]))
            .unwrap()
            .is_none()
    );
}

#[test]
fn tampered_replayed_and_out_of_epoch_messages_are_refused_each_by_its_kind() {
    let mut people = group(3);
    let alice = people[0].id();

    // Tampered: one bit of the ciphertext. The genuine message still opens afterwards: a
    // forgery does not burn the key it tried.
    let m = people[0].send("hello");
    let mut bad = m.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(matches!(people[1].refuse(&bad), MlsError::Tampered));
    people[1].read(&m, alice, "hello");

    // Replayed: the same message a second time.
    assert!(matches!(people[1].refuse(&m), MlsError::Replayed));

    // Not an MLS message at all, and one for another conversation.
    assert!(matches!(
        people[1].refuse(b"\x00\x01garbage"),
        MlsError::Malformed { .. }
    ));
    let mut others = group(2);
    let elsewhere = others[0].send("elsewhere");
    assert!(matches!(people[1].refuse(&elsewhere), MlsError::WrongGroup));

    // Out of epoch, in the past: a message made in an epoch the group has left (the relay
    // will refuse it before anyone sees it; a member who meets it refuses it too).
    let old = people[0].send("old");
    for _ in 0..=PAST_EPOCHS_KEPT {
        let out = people[2].conv().update().unwrap();
        deliver_commit(&mut people, 2, &out.commit);
    }
    let current = people[1].conv().epoch();
    match people[1].refuse(&old) {
        MlsError::OldEpoch {
            message,
            current: c,
        } => {
            assert_eq!(c, current);
            assert_eq!(message, current - 1 - PAST_EPOCHS_KEPT as u64);
        }
        other => panic!("{other:?}"),
    }

    // Out of epoch, in the future: bob has not seen the commit the message was sent after.
    let out = people[2].conv().update().unwrap();
    people[2].conv().commit_accepted().unwrap();
    people[0].apply(&out.commit);
    let ahead = people[0].send("ahead");
    match people[1].refuse(&ahead) {
        MlsError::FutureEpoch { message, current } => assert_eq!(message, current + 1),
        other => panic!("{other:?}"),
    }
    // Once he processes the commit, the same bytes open.
    people[1].apply(&out.commit);
    people[1].read(&ahead, alice, "ahead");
}

#[test]
fn a_member_offline_across_several_commits_catches_up_in_order() {
    let mut people = group(4);
    let (alice, bob, carol) = (people[0].id(), people[1].id(), people[2].id());
    // Dave (people[3]) is offline: everything meant for him queues, in the relay's order.
    let mut queue: Vec<Vec<u8>> = Vec::new();
    let mut online = people.split_off(3);
    let dave = &mut online[0];

    let eve = Person::new();
    let out = people[0].conv().add(&[eve.key_package()]).unwrap();
    deliver_commit(&mut people, 0, &out.commit);
    queue.push(out.commit);
    queue.push(people[1].send("one"));
    let out = people[1].conv().update().unwrap();
    deliver_commit(&mut people, 1, &out.commit);
    queue.push(out.commit);
    let out = people[0].conv().remove(&[carol]).unwrap();
    deliver_commit(&mut people, 0, &out.commit);
    queue.push(out.commit);
    people.remove(2);
    queue.push(people[0].send("two"));

    // Out of order, the last message is from an epoch dave has not reached.
    assert!(matches!(
        dave.refuse(queue.last().unwrap()),
        MlsError::FutureEpoch { .. }
    ));
    // In order, everything applies.
    let mut texts = Vec::new();
    for bytes in &queue {
        match dave.conv().process(bytes).unwrap() {
            Incoming::Message {
                sender, plaintext, ..
            } => texts.push((sender, String::from_utf8(plaintext.to_vec()).unwrap())),
            Incoming::Commit { .. } | Incoming::LeaveRequest { .. } => {}
        }
    }
    assert_eq!(
        texts,
        vec![(bob, "one".to_owned()), (alice, "two".to_owned())]
    );
    assert_eq!(dave.conv().epoch(), people[0].conv().epoch());
    assert_eq!(
        dave.conv().roster().unwrap(),
        people[0].conv().roster().unwrap()
    );
    assert!(!dave.conv().roster().unwrap().contains(&carol));
}

/// A member whose copy missed a commit for good (it never arrives) reads nothing more: every
/// later message is from an epoch it cannot reach. It asks to be let back in — a request signed
/// with its identity key naming its leaf, the group and the epoch it is stuck in — and another
/// member removes that leaf and adds its new KeyPackage in one commit. It joins from the
/// Welcome and reads and writes again; what was sent while it was out stays unreadable. The
/// same request again (a replay, or a second member answering) is stale; a request whose
/// signature does not cover what it claims, or from a member who is not behind, is refused.
#[test]
fn a_member_that_missed_a_commit_for_good_is_let_back_in() {
    let mut people = group(3);
    let (alice, bob, carol) = (people[0].id(), people[1].id(), people[2].id());
    bob_misses_a_commit(&mut people);
    let missed = people[0].send("sent while bob was out of step");
    let missed_secret = people[0].exporter();
    assert!(matches!(
        people[1].refuse(&missed),
        MlsError::FutureEpoch { .. }
    ));

    let (id, stuck, request) = people[1].rejoin_request();
    // The group and the epoch are signed: a relay cannot point the request elsewhere.
    for (group, epoch) in [
        (id, stuck + 1),
        (people[0].mls.create_conversation().unwrap().id(), stuck),
    ] {
        assert!(matches!(
            RejoinRequest::from_bytes(&request, group, epoch),
            Err(MlsError::BadRejoin(_))
        ));
    }
    let mut forged = request.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    assert!(matches!(
        RejoinRequest::from_bytes(&forged, id, stuck),
        Err(MlsError::BadRejoin(_))
    ));
    assert!(matches!(
        RejoinRequest::from_bytes(&request[..request.len() - 1], id, stuck),
        Err(MlsError::Malformed { .. })
    ));
    let parsed = RejoinRequest::from_bytes(&request, id, stuck).unwrap();
    assert_eq!(parsed.package.user_id(), bob);
    people[2].conv().check_rejoin(&parsed).unwrap();

    // Alice lets bob back in: one commit, then the Welcome for bob alone.
    let readmit = people[0].conv().readmit(&parsed).unwrap();
    people[0].conv().commit_accepted().unwrap();
    match people[2].apply(&readmit.commit) {
        Incoming::Commit { events, .. } => {
            assert_eq!(
                events,
                [RosterEvent::Rejoined {
                    by: alice,
                    member: bob
                }]
            );
        }
        other => panic!("expected a commit, got {other:?}"),
    }
    people[1].join(&readmit.welcome.clone().unwrap());
    assert_agree(&mut people);
    let m = people[2].send("welcome back");
    people[1].read(&m, carol, "welcome back");
    people[0].read(&m, carol, "welcome back");
    let m = people[1].send("I am back");
    people[0].read(&m, bob, "I am back");
    people[2].read(&m, bob, "I am back");
    // What was sent while bob was out stays unreadable for him: the Welcome brought him into
    // the epoch after it, with none of the secrets of the epoch it was sent in.
    assert_ne!(people[1].exporter(), missed_secret);
    match people[1].refuse(&missed) {
        MlsError::OldEpoch { message, current } => {
            assert_eq!((message, current), (stuck + 1, stuck + 2));
        }
        other => panic!("{other:?}"),
    }

    // The same request again names a leaf bob no longer has.
    assert!(matches!(
        people[2].conv().check_rejoin(&parsed),
        Err(MlsError::StaleRejoin)
    ));
    assert!(matches!(
        people[0].conv().readmit(&parsed),
        Err(MlsError::StaleRejoin)
    ));
    // A member whose copy is not behind has nothing to ask for.
    let (_, current, request) = people[2].rejoin_request();
    let parsed = RejoinRequest::from_bytes(&request, id, current).unwrap();
    assert!(matches!(
        people[0].conv().check_rejoin(&parsed),
        Err(MlsError::BadRejoin(_))
    ));
}

/// The Welcome that let a member back in can be lost too: its copy still knows the leaf the
/// group replaced, so its next request names that leaf. The members, who remember the return
/// (with their state), take it as long as its KeyPackage is new; a replay of either request
/// stays stale.
#[test]
fn a_member_whose_return_was_lost_is_let_back_in_when_it_asks_again() {
    let mut people = group(3);
    let (alice, bob, carol) = (people[0].id(), people[1].id(), people[2].id());
    bob_misses_a_commit(&mut people);
    let (id, stuck, first) = people[1].rejoin_request();
    let first = RejoinRequest::from_bytes(&first, id, stuck).unwrap();
    let lost = people[0].conv().readmit(&first).unwrap();
    deliver_commit(&mut people[..1], 0, &lost.commit);
    people[2].apply(&lost.commit);
    // The Welcome never reaches bob: his copy is the stuck one still.
    drop(lost.welcome);
    assert_eq!(people[1].conv().epoch(), stuck);

    // What a member remembers of the return survives its state's round trip through bytes.
    let bytes = people[2].conv().to_bytes();
    people[2].conv = Some(Conversation::from_bytes(&bytes, &people[2].mls).unwrap());
    // The first request again (a replay) is stale: its package is bob's leaf now.
    for p in [0, 2] {
        assert!(matches!(
            people[p].conv().check_rejoin(&first),
            Err(MlsError::StaleRejoin)
        ));
    }
    let (_, again_epoch, again) = people[1].rejoin_request();
    assert_eq!(again_epoch, stuck);
    let again = RejoinRequest::from_bytes(&again, id, stuck).unwrap();
    assert_eq!(
        again.leaf_key, first.leaf_key,
        "his copy still knows the old leaf"
    );
    people[2].conv().check_rejoin(&again).unwrap();
    let back = people[0].conv().readmit(&again).unwrap();
    people[0].conv().commit_accepted().unwrap();
    match people[2].apply(&back.commit) {
        Incoming::Commit { events, .. } => assert_eq!(
            events,
            [RosterEvent::Rejoined {
                by: alice,
                member: bob
            }]
        ),
        other => panic!("expected a commit, got {other:?}"),
    }
    people[1].join(&back.welcome.unwrap());
    assert_agree(&mut people);
    let m = people[1].send("back at last");
    people[0].read(&m, bob, "back at last");
    people[2].read(&m, bob, "back at last");
    let m = people[2].send("hello again");
    people[1].read(&m, carol, "hello again");

    // Neither request lets anyone churn bob now.
    for request in [&first, &again] {
        for p in [0, 2] {
            assert!(matches!(
                people[p].conv().check_rejoin(request),
                Err(MlsError::StaleRejoin)
            ));
        }
    }
}

/// Of two members answering one rejoin request at once, the relay accepts one commit; the
/// other's, made again on the winner, has nothing left to do.
#[test]
fn two_members_answering_one_rejoin_request_readmit_once() {
    let mut people = group(3);
    bob_misses_a_commit(&mut people);
    let (id, stuck, request) = people[1].rejoin_request();
    let parsed = RejoinRequest::from_bytes(&request, id, stuck).unwrap();
    let winner = people[0].conv().readmit(&parsed).unwrap();
    let _loser = people[2].conv().readmit(&parsed).unwrap();
    // The relay took alice's: carol's is dropped, its intent kept.
    people[0].conv().commit_accepted().unwrap();
    let intent = people[2].conv().commit_rejected().unwrap();
    assert!(matches!(intent, Intent::Readmit { .. }));
    people[2].apply(&winner.commit);
    assert!(people[2].conv().retry(intent).unwrap().is_none());
    people[1].join(&winner.welcome.unwrap());
    assert_agree(&mut people);
}

#[test]
fn state_survives_a_round_trip_through_bytes() {
    let mut people = group(3);
    let bytes = people[1].conv().to_bytes();
    let restored = Conversation::from_bytes(&bytes, &people[1].mls).unwrap();
    assert_eq!(restored.id(), people[1].conv().id());
    assert_eq!(restored.epoch(), people[1].conv().epoch());
    assert_eq!(*restored.to_bytes(), *bytes);
    people[1].conv = Some(restored);

    // The restored member reads, sends and commits.
    let m = people[0].send("after restore");
    let from = people[0].id();
    people[1].read(&m, from, "after restore");
    let r = people[1].send("me too");
    let from = people[1].id();
    people[2].read(&r, from, "me too");
    let out = people[1].conv().update().unwrap();
    deliver_commit(&mut people, 1, &out.commit);
    assert_agree(&mut people);

    // Another identity cannot load it, and damage is refused.
    let stranger = MlsIdentity::new(&IdentityKeyPair::generate());
    assert!(matches!(
        Conversation::from_bytes(&people[1].conv().to_bytes(), &stranger),
        Err(MlsError::Unsupported("another identity's conversation"))
    ));
    let mut damaged = people[1].conv().to_bytes().to_vec();
    damaged.truncate(damaged.len() / 2);
    assert!(matches!(
        Conversation::from_bytes(&damaged, &people[1].mls),
        Err(MlsError::Malformed { .. })
    ));
}

#[test]
fn key_packages_are_one_time_except_the_last_resort_one_and_survive_a_restart() {
    let alice = Person::new();
    let bob_key = IdentityKeyPair::generate();
    let bob = MlsIdentity::new(&bob_key);
    let one_time = bob.key_package().unwrap();
    let last_resort = bob.last_resort_key_package().unwrap();
    assert!(!one_time.last_resort && last_resort.last_resort);
    assert_ne!(one_time.hash_ref, last_resort.hash_ref);

    // Bob restarts: his KeyPackage store comes back from its sealed bytes.
    let bob = MlsIdentity::restore(&bob_key, &bob.key_store_to_bytes()).unwrap();

    let mut g1 = alice.mls.create_conversation().unwrap();
    let kp = MemberKeyPackage::from_bytes(&one_time.bytes, bob_key.user_id()).unwrap();
    let w1 = g1.add(&[kp]).unwrap().welcome.unwrap();
    let joined = bob.join(&w1).unwrap();
    assert_eq!(joined.roster().unwrap().len(), 2);
    // The one-time package is spent: the same Welcome cannot be used twice.
    assert!(matches!(bob.join(&w1), Err(MlsError::NoMatchingKeyPackage)));

    // The last-resort one serves two adders.
    for _ in 0..2 {
        let mut g = alice.mls.create_conversation().unwrap();
        let kp = MemberKeyPackage::from_bytes(&last_resort.bytes, bob_key.user_id()).unwrap();
        let w = g.add(&[kp]).unwrap().welcome.unwrap();
        assert!(bob.join(&w).is_ok());
    }

    // A KeyPackage handed out under another id is refused; so are bytes that are not one.
    assert!(matches!(
        MemberKeyPackage::from_bytes(&one_time.bytes, alice.id()),
        Err(MlsError::InvalidKeyPackage(_))
    ));
    assert!(matches!(
        MemberKeyPackage::from_bytes(&w1, bob_key.user_id()),
        Err(MlsError::Malformed { .. })
    ));
    let mut forged = one_time.bytes.clone();
    let mid = forged.len() / 2;
    forged[mid] ^= 1;
    assert!(matches!(
        MemberKeyPackage::from_bytes(&forged, bob_key.user_id()),
        Err(MlsError::InvalidKeyPackage(_))
    ));
}

#[test]
fn adding_a_member_twice_or_removing_a_stranger_is_refused() {
    let mut people = group(2);
    let bob = people[1].id();
    let stranger = IdentityKeyPair::generate().user_id();
    let again = people[1].key_package();
    assert!(matches!(
        people[0].conv().add(&[again]),
        Err(MlsError::AlreadyMember(id)) if id == bob
    ));
    assert!(matches!(
        people[0].conv().remove(&[stranger]),
        Err(MlsError::NotInConversation(id)) if id == stranger
    ));
    let me = people[0].id();
    assert!(matches!(
        people[0].conv().remove(&[me]),
        Err(MlsError::Unsupported(_))
    ));
    assert!(matches!(
        people[0].conv().commit_accepted(),
        Err(MlsError::NoPendingCommit)
    ));
}

#[test]
fn the_relay_sees_a_size_class_not_a_length() {
    let mut people = group(2);
    let short = people[0].send("k");
    let longer = people[0].send(&"x".repeat(150));
    let long = people[0].send(&"x".repeat(300));
    assert_eq!(short.len(), longer.len());
    assert!(long.len() > longer.len());
    eprintln!(
        "wire sizes: 1 B -> {}, 150 B -> {}, 300 B -> {}",
        short.len(),
        longer.len(),
        long.len()
    );
}

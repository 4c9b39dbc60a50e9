//! The product's conversations on MLS, through the client library and a real relay: the rules
//! the commands, `listen`, the TUI and bots all rely on (docs/PROTOCOL.md §9.8).
//!
//! Each client here is a one-shot client (nobody else reads its deliveries), as a `syncra`
//! command is: it processes what it holds with `catch_up`.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use std::time::Duration;

use syncra_client::client::Client;
use syncra_client::{Home, InitOptions, SendState};
use syncra_core::crypto::keyfile::KdfParams;
use syncra_test_relay::TestRelay;

const PASS: &str = "pw for tests";

async fn user(dir: &std::path::Path, relay: &TestRelay, handle: &str) -> Client {
    let options = InitOptions {
        kdf: KdfParams::MINIMUM,
    };
    let mut c = Client::init(Home::at(dir.join(handle)), PASS, options).unwrap();
    c.register(relay.url(), handle).await.unwrap();
    c
}

/// Processes everything the client holds until nothing more comes for a while.
async fn settle(client: &mut Client) {
    while client.catch_up(Duration::from_millis(400)).await.unwrap() > 0 {}
}

/// The texts of a conversation's history (events included), oldest first.
fn texts(client: &Client, with: &str) -> Vec<String> {
    client
        .history_of(with, None)
        .unwrap()
        .into_iter()
        .map(|m| m.text)
        .collect()
}

/// The members of group `g`, sorted.
fn roster(client: &Client) -> Vec<syncra_core::UserId> {
    let mut members = client.book().group("g").unwrap().members.clone();
    members.sort();
    members
}

/// The events a client's follow-ups queued to show as they happen, per message.
fn live_events(client: &mut Client) -> Vec<Vec<String>> {
    client
        .take_follow_up_events()
        .into_iter()
        .filter_map(|i| match i {
            syncra_client::Incoming::Message { events, .. } => Some(events),
            _ => None,
        })
        .collect()
}

async fn add(client: &mut Client, handles: &[&str]) {
    for handle in handles {
        client.add_contact(handle).await.unwrap();
    }
}

/// Both sides write first at the same moment: each creates a 1:1 conversation, so there are
/// two; both then send in the one with the smaller id and read both, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_first_messages_at_once_meet_in_one_conversation() {
    let relay = TestRelay::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let mut alice = user(dir.path(), &relay, "alice").await;
    let mut bob = user(dir.path(), &relay, "bob").await;
    alice.add_contact("bob").await.unwrap();
    bob.add_contact("alice").await.unwrap();
    let (a, b) = tokio::join!(
        alice.send_text("bob", "hi bob"),
        bob.send_text("alice", "hi alice")
    );
    assert_eq!(a.unwrap().state, SendState::Delivered);
    assert_eq!(b.unwrap().state, SendState::Delivered);
    settle(&mut alice).await;
    settle(&mut bob).await;
    assert_eq!(alice.conversation_count(), 2, "both conversations exist");
    let bob_id = bob.user_id();
    let alice_id = alice.user_id();
    let chosen = alice.direct_with(bob_id).unwrap();
    assert_eq!(
        bob.direct_with(alice_id),
        Some(chosen),
        "both pick the same one"
    );

    alice.send_text("bob", "second from alice").await.unwrap();
    bob.send_text("alice", "second from bob").await.unwrap();
    settle(&mut alice).await;
    settle(&mut bob).await;
    assert_eq!(
        texts(&alice, "bob"),
        ["hi bob", "hi alice", "second from alice", "second from bob"]
    );
    assert_eq!(
        texts(&bob, "alice"),
        ["hi alice", "hi bob", "second from bob", "second from alice"]
    );
    assert_eq!(alice.rejected_count() + bob.rejected_count(), 0);
}

/// A member whose state is behind a commit it has not processed sends: the relay refuses the
/// message made in the old epoch (`wrong_epoch`); the client processes what it missed and
/// encrypts the same message again, and everyone — the new member included — reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_behind_a_commit_catches_up_and_is_encrypted_again() {
    let relay = TestRelay::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let mut alice = user(dir.path(), &relay, "alice").await;
    let mut bob = user(dir.path(), &relay, "bob").await;
    let mut dave = user(dir.path(), &relay, "dave").await;
    add(&mut alice, &["bob"]).await;
    add(&mut bob, &["alice", "dave"]).await;
    add(&mut dave, &["bob"]).await;
    alice.group_create("g", &["bob".to_owned()]).await.unwrap();
    settle(&mut bob).await;
    let group = bob.book().group("g").unwrap().clone();
    assert_eq!(group.members.len(), 2);
    let grown = bob
        .group_update("g", &["dave".to_owned()], &[])
        .await
        .unwrap();
    assert_eq!(grown.members.len(), 3);

    // Alice has not processed bob's commit yet.
    let report = alice.send_text("@g", "after the add").await.unwrap();
    assert_eq!(report.state, SendState::Delivered, "{report:?}");
    // She processed the commit it missed (it is in her history now)...
    let history = texts(&alice, "@g");
    assert!(
        history.iter().any(|t| t.starts_with("bob added ")),
        "{history:?}"
    );
    settle(&mut bob).await;
    settle(&mut dave).await;
    assert!(texts(&bob, "@g").contains(&"after the add".to_owned()));
    let daves = dave.book().groups.values().next().unwrap().name.clone();
    assert!(texts(&dave, &format!("@{daves}")).contains(&"after the add".to_owned()));
}

/// Two members change the roster at the same moment: the relay accepts one commit for the
/// epoch; the other member processes the winner and makes its change again. Everyone ends
/// with the same roster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_roster_changes_one_wins_and_the_other_is_made_again() {
    let relay = TestRelay::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let mut alice = user(dir.path(), &relay, "alice").await;
    let mut bob = user(dir.path(), &relay, "bob").await;
    let mut dave = user(dir.path(), &relay, "dave").await;
    let mut erin = user(dir.path(), &relay, "erin").await;
    add(&mut alice, &["bob", "dave"]).await;
    add(&mut bob, &["alice", "erin"]).await;
    add(&mut dave, &["alice"]).await;
    add(&mut erin, &["bob"]).await;
    alice.group_create("g", &["bob".to_owned()]).await.unwrap();
    settle(&mut bob).await;
    let (to_dave, to_erin) = (["dave".to_owned()], ["erin".to_owned()]);
    let (a, b) = tokio::join!(
        alice.group_update("g", &to_dave, &[]),
        bob.group_update("g", &to_erin, &[])
    );
    a.unwrap();
    b.unwrap();
    settle(&mut alice).await;
    settle(&mut bob).await;
    assert_eq!(roster(&alice).len(), 4, "{:?}", roster(&alice));
    assert_eq!(roster(&alice), roster(&bob));
    // Both new members joined and read the group.
    alice.send_text("@g", "welcome both").await.unwrap();
    for c in [&mut dave, &mut erin] {
        settle(c).await;
        let name = c.book().groups.values().next().unwrap().name.clone();
        assert!(texts(c, &format!("@{name}")).contains(&"welcome both".to_owned()));
    }
}

/// What a long-running session's loop (`Serve`) does with what arrives: processes each
/// delivery, then the follow-ups it left.
async fn serve_for_a_while(
    client: &mut Client,
    pushes: &mut tokio::sync::mpsc::Receiver<syncra_client::net::Push>,
) {
    use syncra_client::net::Push;
    while let Ok(Some(push)) = tokio::time::timeout(Duration::from_millis(400), pushes.recv()).await
    {
        match push {
            Push::Deliver(carriage) => {
                client.receive(&carriage).await.unwrap();
            }
            Push::Pending(entry, carriage) => {
                client.receive(&carriage).await.unwrap();
                client.acknowledge(entry).await;
            }
            _ => continue,
        }
        client.follow_up().await;
    }
}

/// In a long-running session (the TUI, `listen`, a bot: its loop owns the deliveries) a roster
/// change that loses its epoch is not an error: the person is told it is made again once the
/// other member's change arrives, and the loop makes it then — the event "you added dave"
/// follows, and everyone ends with the same roster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_roster_change_that_loses_its_epoch_in_a_long_running_session_is_made_again() {
    let relay = TestRelay::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let mut alice = user(dir.path(), &relay, "alice").await;
    let mut bob = user(dir.path(), &relay, "bob").await;
    let mut dave = user(dir.path(), &relay, "dave").await;
    let mut erin = user(dir.path(), &relay, "erin").await;
    add(&mut alice, &["bob", "dave"]).await;
    add(&mut bob, &["alice", "erin"]).await;
    add(&mut dave, &["alice"]).await;
    add(&mut erin, &["bob"]).await;
    alice.group_create("g", &["bob".to_owned()]).await.unwrap();
    settle(&mut bob).await;
    // Alice's deliveries go to her loop from now on, as in the TUI.
    let mut pushes = alice.take_pushes().unwrap();
    bob.group_update("g", &["erin".to_owned()], &[])
        .await
        .unwrap();
    // Alice's loop has not processed bob's commit yet: her change loses the epoch.
    alice
        .group_update("g", &["dave".to_owned()], &[])
        .await
        .unwrap();
    let said = texts(&alice, "@g");
    assert!(
        said.iter()
            .any(|t| t.contains("at the same moment; adding dave is made again")),
        "{said:?}"
    );
    assert!(!said.contains(&"you added dave".to_owned()), "{said:?}");
    serve_for_a_while(&mut alice, &mut pushes).await;
    let said = texts(&alice, "@g");
    assert!(said.contains(&"you added dave".to_owned()), "{said:?}");
    // Shown as it happens, not only on the next look at the history.
    let live = live_events(&mut alice);
    assert_eq!(live, [["you added dave"]]);
    settle(&mut bob).await;
    settle(&mut dave).await;
    assert_eq!(roster(&alice).len(), 4, "{:?}", roster(&alice));
    assert_eq!(roster(&alice), roster(&bob));
    // Her outbox (the group's name for dave, which waited for the new epoch) and a message.
    alice.drain_outbox().await.unwrap();
    alice.send_text("@g", "hello dave").await.unwrap();
    settle(&mut dave).await;
    let name = dave.book().groups.values().next().unwrap().name.clone();
    assert!(texts(&dave, &format!("@{name}")).contains(&"hello dave".to_owned()));
}

/// A member leaves: its request (a proposal) is committed by another member's client at its
/// next turn; the leaver learns it is out, the others see who removed whom, and nothing sent
/// afterwards reaches the leaver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_leaves_and_another_members_client_commits_it() {
    let relay = TestRelay::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let mut alice = user(dir.path(), &relay, "alice").await;
    let mut bob = user(dir.path(), &relay, "bob").await;
    let mut carol = user(dir.path(), &relay, "carol").await;
    add(&mut alice, &["bob", "carol"]).await;
    add(&mut bob, &["alice"]).await;
    add(&mut carol, &["alice"]).await;
    alice
        .group_create("g", &["bob".to_owned(), "carol".to_owned()])
        .await
        .unwrap();
    settle(&mut bob).await;
    settle(&mut carol).await;
    carol.group_leave("g").await.unwrap();
    settle(&mut bob).await;
    bob.follow_up().await;
    settle(&mut alice).await;
    settle(&mut carol).await;
    // Carol and bob are not each other's contacts: they see short ids.
    let seen = texts(&carol, "@g");
    assert!(seen.iter().any(|t| t.ends_with(" removed you")), "{seen:?}");
    let seen = texts(&bob, "@g");
    assert!(seen.iter().any(|t| t.ends_with(" left")), "{seen:?}");
    assert!(texts(&alice, "@g").contains(&"bob removed carol".to_owned()));
    assert_eq!(alice.book().group("g").unwrap().members.len(), 2);
    alice.send_text("@g", "just us").await.unwrap();
    settle(&mut carol).await;
    assert!(!texts(&carol, "@g").contains(&"just us".to_owned()));
    let refused = carol.send_text("@g", "still here?").await.unwrap();
    assert!(
        matches!(&refused.state, SendState::Failed(why) if why.contains("no longer a member")),
        "{refused:?}"
    );
}

/// Several processes of one home (the TUI, `listen`, one-shot commands) share its MLS state
/// under a lock: each reads what the others wrote before using it, so they send in one
/// conversation, never reuse a message key, and a delivery both get is filed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_of_one_home_share_their_conversations() {
    let relay = TestRelay::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let mut first = user(dir.path(), &relay, "alice").await;
    let mut bob = user(dir.path(), &relay, "bob").await;
    first.add_contact("bob").await.unwrap();
    bob.add_contact("alice").await.unwrap();
    let mut second = Client::open(Home::at(dir.path().join("alice")), PASS).unwrap();
    second.connect().await.unwrap();

    first.send_text("bob", "from the first").await.unwrap();
    second.send_text("bob", "from the second").await.unwrap();
    assert_eq!(
        first.direct_with(bob.user_id()),
        second.direct_with(bob.user_id())
    );
    for n in 0..5 {
        first.send_text("bob", &format!("a{n}")).await.unwrap();
        second.send_text("bob", &format!("b{n}")).await.unwrap();
    }
    settle(&mut bob).await;
    let got = texts(&bob, "alice");
    assert_eq!(got.len(), 12, "{got:?}");
    assert_eq!(bob.rejected_count(), 0, "no message key was used twice");

    bob.send_text("alice", "to both").await.unwrap();
    settle(&mut first).await;
    settle(&mut second).await;
    let mine = texts(&first, "bob");
    assert_eq!(
        mine.iter().filter(|t| *t == "to both").count(),
        1,
        "{mine:?}"
    );
    assert_eq!(first.rejected_count() + second.rejected_count(), 0);
}

/// A group entry from before groups moved to MLS has no MLS group behind it: sending to it
/// fails with what to do, and nothing is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_from_before_mls_says_to_create_it_again() {
    use syncra_client::contacts::{Book, Group};
    use syncra_client::keystore::KeyStore;
    let relay = TestRelay::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let mut alice = user(dir.path(), &relay, "alice").await;
    let bob = user(dir.path(), &relay, "bob").await;
    alice.add_contact("bob").await.unwrap();
    let home = alice.home().clone();
    let keys = KeyStore::unlock(&home.key_file(), PASS.as_bytes(), false).unwrap();
    let mut book = Book::load(home.contacts_file(), home.groups_file(), keys.storage).unwrap();
    {
        let _lock = book.lock().unwrap();
        book.groups.insert(
            "00112233445566778899aabbccddeeff".into(),
            Group {
                id: "00112233445566778899aabbccddeeff".into(),
                name: "old".into(),
                members: vec![alice.user_id(), bob.user_id()],
                updated_ms: 1,
                creator: Some(alice.user_id()),
            },
        );
        book.save().unwrap();
    }
    let report = alice.send_text("@old", "anyone?").await.unwrap();
    assert!(
        matches!(&report.state, SendState::Failed(why) if why.contains("before groups moved to MLS")),
        "{report:?}"
    );
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// Alice, bob, carol and dave, with group "g" of alice, bob and carol, to which alice then
/// added dave — a commit bob processed and then lost: his MLS state was put back from a copy
/// taken before it, and his client opened again and connected.
async fn bob_missed_a_commit(relay: &TestRelay, dir: &std::path::Path) -> [Client; 4] {
    let mut alice = user(dir, relay, "alice").await;
    let mut bob = user(dir, relay, "bob").await;
    let mut carol = user(dir, relay, "carol").await;
    let mut dave = user(dir, relay, "dave").await;
    add(&mut alice, &["bob", "carol", "dave"]).await;
    add(&mut bob, &["alice", "carol"]).await;
    add(&mut carol, &["alice", "bob"]).await;
    add(&mut dave, &["alice"]).await;
    alice
        .group_create("g", &["bob".to_owned(), "carol".to_owned()])
        .await
        .unwrap();
    settle(&mut bob).await;
    settle(&mut carol).await;

    // A copy of bob's MLS state as it is now.
    let bob_home = bob.home().clone();
    let copy = dir.join("bob-mls-copy");
    copy_dir(&bob_home.mls_dir(), &copy);
    // Alice adds dave; bob processes the commit...
    alice
        .group_update("g", &["dave".to_owned()], &[])
        .await
        .unwrap();
    for c in [&mut bob, &mut carol, &mut dave] {
        settle(c).await;
    }
    // ...and loses it: his MLS state is put back from the copy.
    bob.disconnect().await;
    drop(bob);
    std::fs::remove_dir_all(bob_home.mls_dir()).unwrap();
    copy_dir(&copy, &bob_home.mls_dir());
    let mut bob = Client::open(bob_home, PASS).unwrap();
    bob.connect().await.unwrap();
    [alice, bob, carol, dave]
}

/// A member whose copy of a group missed a commit for good — here its MLS state put back from a
/// copy taken before the commit, as a restore from backup does; a commit delivered live to a
/// process that died, or dropped by the mailbox after its time to live, leaves the same — reads
/// nothing more: every later message is from an epoch it cannot reach. Its client asks the
/// members to let it back in; another member's client readmits it (one commit, one Welcome).
/// Then it reads and writes again, what it typed meanwhile goes out, everyone sees who let whom
/// back in, and the one message sent while it was out of step stays unreadable to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_missed_a_commit_for_good_is_let_back_in() {
    let relay = TestRelay::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let [mut alice, mut bob, mut carol, mut dave] = bob_missed_a_commit(&relay, dir.path()).await;

    alice
        .send_text("@g", "while bob is out of step")
        .await
        .unwrap();
    settle(&mut bob).await;
    // Held, not refused: the commit before it might only be late.
    assert_eq!(bob.rejected_count(), 0);
    // What bob types now cannot go out yet (his copy is behind): it waits in his outbox.
    let typed = bob.send_text("@g", "typed while stuck").await.unwrap();
    assert!(!matches!(typed.state, SendState::Delivered), "{typed:?}");
    assert_eq!(bob.outbox_len(), 1);
    // A commit may only be late (one stored during a login race comes at the next ping): his
    // client waits REJOIN_GRACE (45 s) before asking...
    bob.follow_up().await;
    assert!(
        !texts(&bob, "@g")
            .iter()
            .any(|t| t.contains("asked the members")),
        "asked at once"
    );
    // ...which this test does not sit out.
    bob.rejoin_after(Duration::ZERO);
    bob.follow_up().await;
    assert!(
        texts(&bob, "@g")
            .iter()
            .any(|t| t.contains("asked the members to let it back in")),
        "{:?}",
        texts(&bob, "@g")
    );

    // Alice's client answers; carol's finds the request answered already.
    settle(&mut alice).await;
    alice.follow_up().await;
    // What a long-running session (the TUI, `listen`) shows as it happens.
    let live = live_events(&mut alice);
    assert_eq!(live, [["you let bob back in"]]);
    settle(&mut carol).await;
    carol.follow_up().await;
    assert!(carol.take_follow_up_events().is_empty(), "answered already");
    settle(&mut dave).await;
    dave.follow_up().await;
    settle(&mut bob).await;
    assert!(
        texts(&bob, "@g")
            .iter()
            .any(|t| t.starts_with("you are back in")),
        "{:?}",
        texts(&bob, "@g")
    );
    // Back in, what was sent while he was out of step is refused, once.
    assert_eq!(bob.rejected_count(), 1, "the message he cannot read");
    let sent = bob.drain_outbox().await.unwrap();
    assert!(
        sent.iter().all(|r| r.state == SendState::Delivered),
        "{sent:?}"
    );
    alice.send_text("@g", "welcome back").await.unwrap();
    bob.send_text("@g", "I am back").await.unwrap();
    for c in [&mut alice, &mut bob, &mut carol, &mut dave] {
        settle(c).await;
    }

    let bobs = texts(&bob, "@g");
    assert!(bobs.contains(&"welcome back".to_owned()), "{bobs:?}");
    assert!(!bobs.contains(&"while bob is out of step".to_owned()));
    let alices = texts(&alice, "@g");
    for line in ["you let bob back in", "typed while stuck", "I am back"] {
        assert!(alices.contains(&line.to_owned()), "{line}: {alices:?}");
    }
    let carols = texts(&carol, "@g");
    for line in ["alice let bob back in", "typed while stuck", "I am back"] {
        assert!(carols.contains(&line.to_owned()), "{line}: {carols:?}");
    }
    let members = alice.book().group("g").unwrap().members.clone();
    assert_eq!(members.len(), 4);
    assert_eq!(bob.book().group("g").unwrap().members, members);
    assert_eq!(carol.book().group("g").unwrap().members, members);
    assert_eq!(
        alice.rejected_count() + carol.rejected_count() + dave.rejected_count(),
        0,
        "nobody but bob refused anything"
    );
}

/// The Welcome that lets a member back in can be lost like any delivery (here: bob is away and
/// the relay's mailbox keeps it one second). His client, still behind, asks again once its wait
/// for an answer ran out, naming the leaf his copy still knows; the members, who remember the
/// first return, let him in again, and everyone reads everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_return_was_lost_asks_again_and_is_let_back_in() {
    let relay = TestRelay::start(|c| {
        c.mailbox["ttl_secs"] = serde_json::json!(1);
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let [mut alice, mut bob, mut carol, mut dave] = bob_missed_a_commit(&relay, dir.path()).await;
    alice.send_text("@g", "while bob is stuck").await.unwrap();
    settle(&mut bob).await;

    let again = "no answer yet; asked the members again to let this device back in";
    let asked = |c: &Client, line: &str| texts(c, "@g").iter().filter(|t| *t == line).count();
    bob.rejoin_after(Duration::ZERO);
    bob.rejoin_again_after(Duration::from_secs(2));
    bob.follow_up().await;
    assert_eq!(
        asked(
            &bob,
            "this device missed a change to the group; asked the members to let it back in"
        ),
        1
    );
    // Not again before the wait.
    bob.follow_up().await;
    assert_eq!(asked(&bob, again), 0);

    // Bob is away when alice lets him back in; the Welcome waits for him in the mailbox and
    // expires there.
    bob.disconnect().await;
    settle(&mut alice).await;
    alice.follow_up().await;
    assert_eq!(live_events(&mut alice), [["you let bob back in"]]);
    for c in [&mut carol, &mut dave] {
        settle(c).await;
        c.follow_up().await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    bob.connect().await.unwrap();
    settle(&mut bob).await;
    assert!(
        !texts(&bob, "@g")
            .iter()
            .any(|t| t.starts_with("you are back in")),
        "the Welcome was kept: {:?}",
        texts(&bob, "@g")
    );

    // His wait ran out: he asks again, naming the leaf his copy still knows.
    bob.follow_up().await;
    assert_eq!(asked(&bob, again), 1, "{:?}", texts(&bob, "@g"));
    settle(&mut alice).await;
    alice.follow_up().await;
    assert_eq!(live_events(&mut alice), [["you let bob back in"]]);
    for c in [&mut carol, &mut dave] {
        settle(c).await;
        c.follow_up().await;
    }
    settle(&mut bob).await;
    assert!(
        texts(&bob, "@g")
            .iter()
            .any(|t| t.starts_with("you are back in")),
        "{:?}",
        texts(&bob, "@g")
    );
    alice.send_text("@g", "welcome back").await.unwrap();
    bob.send_text("@g", "back at last").await.unwrap();
    for c in [&mut alice, &mut bob, &mut carol, &mut dave] {
        settle(c).await;
    }
    assert!(texts(&bob, "@g").contains(&"welcome back".to_owned()));
    for c in [&alice, &carol, &dave] {
        assert!(texts(c, "@g").contains(&"back at last".to_owned()));
    }
    let members = alice.book().group("g").unwrap().members.clone();
    assert_eq!(members.len(), 4);
    assert_eq!(bob.book().group("g").unwrap().members, members);
    assert_eq!(
        alice.rejected_count() + carol.rejected_count() + dave.rejected_count(),
        0,
        "no member refused the second request"
    );
    // Once back, the client has nothing more to ask.
    bob.follow_up().await;
    assert_eq!(asked(&bob, again), 1);
}

/// A damaged KeyPackage store and leaf schedule no longer stop the client: both are set aside
/// (renamed, listed), a new store takes the old one's place, and the packages published from
/// the old one — whose private halves are gone — are withdrawn from the directory when the
/// client connects, so whoever adds this member next gets a package it can join with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_key_package_store_is_set_aside_and_its_packages_withdrawn() {
    let relay = TestRelay::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let mut alice = user(dir.path(), &relay, "alice").await;
    let mut bob = user(dir.path(), &relay, "bob").await;
    add(&mut alice, &["bob"]).await;
    add(&mut bob, &["alice"]).await;

    let bob_home = bob.home().clone();
    bob.disconnect().await;
    drop(bob);
    for file in ["key-packages.state", "leaf-updates.state"] {
        let path = bob_home.mls_dir().join(file);
        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x20;
        std::fs::write(&path, bytes).unwrap();
    }
    let mut bob = Client::open(bob_home.clone(), PASS).unwrap();
    let aside: Vec<_> = bob.conversations_set_aside().to_vec();
    assert_eq!(aside.len(), 2, "{aside:?}");
    for (aside, file) in aside
        .iter()
        .zip(["key-packages.state.damaged", "leaf-updates.state.damaged"])
    {
        assert_eq!(aside.id, None);
        assert_eq!(aside.path, bob_home.mls_dir().join(file));
        assert!(aside.path.exists());
    }
    bob.connect().await.unwrap();

    // Alice's first message claims one of bob's packages: a fresh one, which he joins with.
    alice.send_text("bob", "can you read this?").await.unwrap();
    settle(&mut bob).await;
    assert_eq!(texts(&bob, "alice"), ["can you read this?"]);
    assert_eq!(bob.rejected_count(), 0);
    bob.send_text("alice", "yes").await.unwrap();
    settle(&mut alice).await;
    assert_eq!(texts(&alice, "bob"), ["can you read this?", "yes"]);
    // Done once: a restart withdraws nothing more.
    let home = bob.home().clone();
    bob.disconnect().await;
    drop(bob);
    assert!(!home.mls_dir().join("withdraw-key-packages").exists());
    let bob = Client::open(home, PASS).unwrap();
    assert!(bob.conversations_set_aside().is_empty());
}

/// A conversation whose state file is damaged (a disk error, a bad copy) no longer stops the
/// client from opening: that one file is renamed `<file>.damaged` (nothing deleted) and listed,
/// every other conversation carries on, a message in the damaged one is refused with what to
/// do, and the next message to that person starts a new 1:1 chat whose id is below the damaged
/// one — so the other side, which still holds the old chat, sends in the new one too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_conversation_is_set_aside_and_a_new_chat_takes_its_place() {
    let relay = TestRelay::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let mut alice = user(dir.path(), &relay, "alice").await;
    let mut bob = user(dir.path(), &relay, "bob").await;
    let mut carol = user(dir.path(), &relay, "carol").await;
    add(&mut alice, &["bob"]).await;
    add(&mut bob, &["alice", "carol"]).await;
    add(&mut carol, &["bob"]).await;
    alice.send_text("bob", "first").await.unwrap();
    carol.send_text("bob", "from carol").await.unwrap();
    settle(&mut bob).await;
    let with_alice = bob.direct_with(alice.user_id()).unwrap();
    let with_carol = bob.direct_with(carol.user_id()).unwrap();

    // Bob's state of his chat with alice is damaged on disk.
    let bob_home = bob.home().clone();
    bob.disconnect().await;
    drop(bob);
    let file = bob_home.mls_dir().join(format!("{with_alice}.state"));
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();

    let mut bob = Client::open(bob_home.clone(), PASS).unwrap();
    let aside = bob.conversations_set_aside().to_vec();
    assert_eq!(aside.len(), 1);
    assert_eq!(aside[0].id, Some(with_alice));
    assert_eq!(
        std::fs::read(&aside[0].path).unwrap(),
        bytes,
        "kept as it was"
    );
    assert!(!file.exists());
    bob.connect().await.unwrap();
    // The chat with carol carries on.
    assert_eq!(bob.direct_with(carol.user_id()), Some(with_carol));
    carol.send_text("bob", "still fine").await.unwrap();
    // Alice still writes in the old chat: refused, saying what to do.
    alice.send_text("bob", "lost on the way").await.unwrap();
    settle(&mut bob).await;
    assert!(texts(&bob, "carol").contains(&"still fine".to_owned()));
    assert_eq!(bob.rejected_count(), 1);

    // Bob writes to alice: a new chat, below the set-aside one; alice answers in it.
    bob.send_text("alice", "my copy broke, here again")
        .await
        .unwrap();
    let new_chat = bob.direct_with(alice.user_id()).unwrap();
    assert!(
        new_chat < with_alice,
        "{new_chat} should sort below {with_alice}"
    );
    settle(&mut alice).await;
    assert_eq!(alice.direct_with(bob.user_id()), Some(new_chat));
    alice.send_text("bob", "got it").await.unwrap();
    settle(&mut bob).await;
    let seen = texts(&bob, "alice");
    assert!(seen.contains(&"got it".to_owned()), "{seen:?}");
    assert!(!seen.contains(&"lost on the way".to_owned()));
    assert_eq!(bob.rejected_count(), 1);
    // Reopening sets nothing aside twice.
    bob.disconnect().await;
    drop(bob);
    let bob = Client::open(bob_home, PASS).unwrap();
    assert!(bob.conversations_set_aside().is_empty());
}

/// A commit that is only late — a message made after it reaches a member first, as a
/// reordering between the mailbox and live delivery can do — does not lose the message: it is
/// held, and read once the commit is processed; nothing is refused and nobody is asked to let
/// anyone back in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_arrives_before_its_commit_is_read_once_the_commit_is() {
    use syncra_client::net::Push;
    let relay = TestRelay::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let mut alice = user(dir.path(), &relay, "alice").await;
    let mut bob = user(dir.path(), &relay, "bob").await;
    let mut dave = user(dir.path(), &relay, "dave").await;
    add(&mut alice, &["bob", "dave"]).await;
    add(&mut bob, &["alice"]).await;
    add(&mut dave, &["alice"]).await;
    alice.group_create("g", &["bob".to_owned()]).await.unwrap();
    settle(&mut bob).await;
    let mut pushes = bob.take_pushes().unwrap();
    alice
        .group_update("g", &["dave".to_owned()], &[])
        .await
        .unwrap();
    alice.send_text("@g", "after the add").await.unwrap();
    let mut carriages = Vec::new();
    while let Ok(Some(push)) = tokio::time::timeout(Duration::from_millis(500), pushes.recv()).await
    {
        if let Push::Deliver(carriage) = push {
            carriages.push(carriage);
        }
    }
    assert!(carriages.len() >= 2, "the commit and what follows it");
    // Everything after the commit first, the commit last.
    carriages.rotate_left(1);
    for carriage in &carriages {
        bob.receive(carriage).await.unwrap();
    }
    let seen = texts(&bob, "@g");
    // Dave is not bob's contact: a short id.
    assert!(
        seen.iter().any(|t| t.starts_with("alice added ")),
        "{seen:?}"
    );
    assert!(seen.contains(&"after the add".to_owned()), "{seen:?}");
    assert_eq!(bob.rejected_count(), 0);
    bob.rejoin_after(Duration::ZERO);
    bob.follow_up().await;
    assert!(
        !texts(&bob, "@g")
            .iter()
            .any(|t| t.contains("asked the members")),
        "caught up: nothing to ask"
    );
}

/// The member list that comes with a commit is unsigned: one that is not the roster the commit
/// made (here rewritten on the way, as a relay could) is written in the group's history as what
/// came with that member's change — the roster shown stays the MLS one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_list_that_is_not_the_roster_is_an_event_in_the_group() {
    use syncra_client::net::Push;
    let relay = TestRelay::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let mut alice = user(dir.path(), &relay, "alice").await;
    let mut bob = user(dir.path(), &relay, "bob").await;
    let mut dave = user(dir.path(), &relay, "dave").await;
    add(&mut alice, &["bob", "dave"]).await;
    add(&mut bob, &["alice", "dave"]).await;
    add(&mut dave, &["alice"]).await;
    alice.group_create("g", &["bob".to_owned()]).await.unwrap();
    settle(&mut bob).await;
    let mut pushes = bob.take_pushes().unwrap();
    alice
        .group_update("g", &["dave".to_owned()], &[])
        .await
        .unwrap();
    let commit = loop {
        match tokio::time::timeout(syncra_test_support::DEADLINE, pushes.recv())
            .await
            .expect("the commit in time")
            .unwrap()
        {
            Push::Deliver(carriage) => break carriage,
            _ => continue,
        }
    };
    let parsed = syncra_core::carriage::parse(&commit).unwrap();
    assert_eq!(
        parsed.header.kind,
        syncra_core::carriage::CarriageKind::Commit
    );
    let mut header = parsed.header.clone();
    // Dave left out of the list the relay would keep.
    header.members.retain(|m| *m != dave.user_id());
    let rewritten = header.encode(parsed.body);
    bob.receive(&rewritten).await.unwrap();
    let seen = texts(&bob, "@g");
    assert!(
        seen.iter().any(|t| t.starts_with("alice added ")),
        "{seen:?}"
    );
    let line = seen
        .iter()
        .find(|t| t.starts_with("the member list that came with alice's change names "))
        .unwrap_or_else(|| panic!("no event for the list: {seen:?}"));
    assert!(line.contains("not who is in the group"), "{line}");
    assert_eq!(roster(&bob).len(), 3, "the roster shown is the MLS one");
}

/// A change without a verdict — here the relay's store hangs, so the relay answers
/// `store_unavailable` after its 5 s store timeout — stays pending with the commit as sent,
/// and goes again by itself at the next connection once the store is back: the members end in one epoch with the
/// change made, and it shows as made. (Before, a refusal that may pass dropped the change, and a
/// commit whose answer was lost stayed pending until another member committed: every later
/// change of this member, its scheduled leaf updates included, was refused meanwhile.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_without_a_verdict_is_sent_again_by_itself() {
    let mut pg = syncra_test_support::postgres::PostgresServer::start();
    let url = pg.url();
    let relay = TestRelay::start(|c| {
        c.store = serde_json::json!({ "kind": "postgres", "url": url });
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut alice = user(dir.path(), &relay, "alice").await;
    let mut bob = user(dir.path(), &relay, "bob").await;
    let mut dave = user(dir.path(), &relay, "dave").await;
    add(&mut alice, &["bob", "dave"]).await;
    add(&mut bob, &["alice"]).await;
    add(&mut dave, &["alice"]).await;
    let both = ["bob".to_owned(), "dave".to_owned()];
    alice.group_create("g", &both).await.unwrap();
    settle(&mut bob).await;
    settle(&mut dave).await;
    assert_eq!(roster(&bob).len(), 3);

    pg.pause();
    alice
        .group_update("g", &[], &["dave".to_owned()])
        .await
        .unwrap();
    let said = texts(&alice, "@g");
    assert!(
        said.iter().any(
            |t| t.starts_with("removing dave has no answer from the relay yet")
                && t.ends_with("it is sent again by itself")
        ),
        "{said:?}"
    );
    // Nothing happened yet: the change is pending, the roster as it was.
    assert_eq!(roster(&alice).len(), 3);
    pg.resume();

    // Her next connection sends it again (a one-shot command's as much as a session's).
    alice.disconnect().await;
    alice.connect().await.unwrap();
    assert!(
        texts(&alice, "@g").contains(&"you removed dave".to_owned()),
        "{:?}",
        texts(&alice, "@g")
    );
    settle(&mut bob).await;
    assert_eq!(roster(&alice).len(), 2, "{:?}", roster(&alice));
    assert_eq!(roster(&alice), roster(&bob));
    // One epoch for both: what alice writes now, bob reads; dave is out.
    alice.send_text("@g", "just us").await.unwrap();
    settle(&mut bob).await;
    assert!(texts(&bob, "@g").contains(&"just us".to_owned()));
    settle(&mut dave).await;
    let name = dave.book().groups.values().next().unwrap().name.clone();
    assert!(!texts(&dave, &format!("@{name}")).contains(&"just us".to_owned()));
}

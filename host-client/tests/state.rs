//! Local state against real `syncra` processes: the outbox never blocks on one bad entry and
//! never re-sends a copy, several processes on one home never lose an update, and what is at
//! rest is encrypted and bound to where it is.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

mod common;

use common::{PASS, User, alice_and_bob};
use syncra_client::keystore::KeyStore;
use syncra_client::outbox::{Outbox, Pending};
use syncra_test_support::process::RelayProcess;

fn outbox_files(user: &User) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(user.home.join("outbox"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".msg"))
        .collect();
    names.sort();
    names
}

#[test]
fn an_outbox_entry_that_cannot_be_sent_is_set_aside_and_the_rest_still_leave() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = RelayProcess::start(&dir.path().join("relay"));
    let (alice, bob) = alice_and_bob(dir.path(), &relay.url());
    bob.ok(&["contact", "add", "alice"]);
    relay.kill();
    let (code, out) = alice.send("bob", "waiting behind a bad entry");
    assert_eq!(code, 3, "{out}");
    // An older entry that names no conversation of ours (as a bug or a damaged copy would).
    let keys = KeyStore::unlock(&alice.home.join("identity.key"), PASS.as_bytes(), false).unwrap();
    Outbox::new(alice.home.join("outbox"), keys.storage.clone())
        .put(&Pending {
            id: "00".repeat(16),
            conversation: "../not-ours".into(),
            text: "never".into(),
            created_ms: 0,
            notify: Vec::new(),
        })
        .unwrap();
    relay.restart();
    let bl = bob.listen();
    // Alice's listener drains her outbox when it connects.
    let _al = alice.listen();
    bl.expect_text("waiting behind a bad entry");
    let status = alice.ok(&["status"]);
    assert!(
        status.contains("outbox:      0 waiting, 1 set aside"),
        "{status}"
    );
    let why = std::fs::read_to_string(
        alice
            .home
            .join("outbox/failed")
            .join(format!("{}.why", "00".repeat(16))),
    )
    .unwrap();
    assert!(why.contains("unknown conversation"), "{why}");
}

#[test]
fn a_copied_outbox_entry_is_not_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = RelayProcess::start(&dir.path().join("relay"));
    let (alice, bob) = alice_and_bob(dir.path(), &relay.url());
    relay.kill();
    assert_eq!(alice.send("bob", "once").0, 3);
    let files = outbox_files(&alice);
    assert_eq!(files.len(), 1);
    let copy = format!("{}.msg", "ab".repeat(16));
    std::fs::copy(
        alice.home.join("outbox").join(&files[0]),
        alice.home.join("outbox").join(&copy),
    )
    .unwrap();
    relay.restart();
    let bl = bob.listen();
    assert_eq!(alice.send("bob", "twice?").0, 0);
    // `send` sends its message, then what waited in the outbox.
    bl.expect_text("twice?");
    bl.expect_text("once");
    // Nothing is left to send again on the next connection: the copy was set aside.
    assert!(
        outbox_files(&alice).is_empty(),
        "{:?}",
        outbox_files(&alice)
    );
    assert!(alice.home.join("outbox/failed").join(&copy).exists());
    let status = alice.ok(&["status"]);
    assert!(
        status.contains("outbox:      0 waiting, 1 set aside"),
        "{status}"
    );
}

#[test]
fn several_processes_on_one_home_never_lose_an_update() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"));
    let names = ["alice", "bob", "carol", "dave", "erin", "frank"];
    let users: Vec<User> = names
        .iter()
        .map(|n| {
            let u = User::new(dir.path(), n);
            u.onboard(&relay.url());
            u
        })
        .collect();
    let alice = &users[0];
    // A long-running listener on alice's home...
    let al = alice.listen();
    // ...while one-shot commands on the same home add contacts, all at once.
    let adds: Vec<std::process::Child> = names[1..]
        .iter()
        .map(|n| alice.cmd(&["contact", "add", n]).spawn().unwrap())
        .collect();
    for mut child in adds {
        assert!(child.wait().unwrap().success());
    }
    // bob writes first: the listener must not write back its stale copy without bob in it
    // (which turned the contact just added into a message request).
    users[1].ok(&["contact", "add", "alice"]);
    assert_eq!(users[1].send("alice", "hi from bob").0, 0);
    let m = al.expect_text("hi from bob");
    assert_eq!(m["type"], "message", "{m}");
    let list = alice.ok(&["contact", "list"]);
    for n in &names[1..] {
        let line = list
            .lines()
            .find(|l| l.starts_with(&format!("{n}\t")))
            .unwrap_or_else(|| panic!("{n} was lost: {list}"));
        assert!(line.ends_with("unverified"), "{line}");
    }
    // Groups made in parallel all survive too.
    let makes: Vec<std::process::Child> = ["g1", "g2", "g3", "g4"]
        .iter()
        .map(|g| alice.cmd(&["group", "create", g, "bob"]).spawn().unwrap())
        .collect();
    for mut child in makes {
        assert!(child.wait().unwrap().success());
    }
    assert_eq!(users[1].send("alice", "still there?").0, 0);
    al.expect_text("still there?");
    let groups = alice.ok(&["group", "list"]);
    assert_eq!(groups.lines().count(), 4, "{groups}");
}

#[test]
fn contacts_and_groups_are_encrypted_at_rest() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"));
    let (alice, _bob) = alice_and_bob(dir.path(), &relay.url());
    alice.ok(&["group", "create", "secretplans", "bob"]);
    let mut seen = String::new();
    for entry in std::fs::read_dir(&alice.home).unwrap().flatten() {
        if entry.path().is_file() {
            seen.push_str(&String::from_utf8_lossy(
                &std::fs::read(entry.path()).unwrap(),
            ));
        }
    }
    for secret in ["bob", "secretplans"] {
        assert!(!seen.contains(secret), "{secret:?} is readable at rest");
    }
    assert!(!alice.home.join("contacts.json").exists());
    assert!(
        alice
            .ok(&["group", "list"])
            .contains("@secretplans\talice, bob")
    );
}

/// Another process of the home holds the MLS state's lock across a network round trip (a send
/// waits for the relay's answer). Waiting for it must leave the runtime serving everything
/// else — a session's keepalives, a screen, other conversations — even on a runtime with a
/// single thread, as a bot or a test uses.
#[test]
fn waiting_for_the_mls_state_lock_leaves_the_runtime_serving_other_tasks() {
    use syncra_client::mls::Conversations;
    use syncra_core::crypto::keys::IdentityKeyPair;
    use syncra_core::crypto::local_box::LocalKey;

    let dir = tempfile::tempdir().unwrap();
    let identity = IdentityKeyPair::generate();
    let mut conversations =
        Conversations::open(&identity, dir.path(), &LocalKey::generate()).unwrap();
    // flock(2) locks conflict between open file descriptions as between processes: this is
    // the other process, holding the lock.
    let other_process = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.path().join("mls.lock"))
        .unwrap();
    other_process.lock().unwrap();

    let (ran, ran_rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let other_task = tokio::spawn(async move { ran.send(()).unwrap() });
            let lock = conversations.lock(&identity).await.unwrap();
            assert!(lock.is_some(), "a kept state is locked");
            other_task.await.unwrap();
        });
    });
    // With a blocking wait the runtime's one thread sits in flock and the other task never
    // runs while the lock is held: this runs out, then the lock is released either way.
    let ran_while_waiting = ran_rx.recv_timeout(syncra_test_support::DEADLINE);
    drop(other_process);
    waiter.join().unwrap();
    assert!(
        ran_while_waiting.is_ok(),
        "the runtime stalled while waiting for the MLS state's lock"
    );
}

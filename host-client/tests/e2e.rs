//! End to end: real `syncra` processes against a real `syncra-relay` process, each user in
//! their own temporary SYNCRA_HOME.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{PASS, User, alice_and_bob, syncra};
use syncra_test_support::DEADLINE;
use syncra_test_support::process::RelayProcess;

#[test]
fn two_people_chat_through_a_real_relay() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"));
    let alice = User::new(dir.path(), "alice");
    let bob = User::new(dir.path(), "bob");
    alice.onboard(&relay.url());
    bob.onboard(&relay.url());
    let added = alice.ok(&["contact", "add", "bob"]);
    assert!(added.contains("added bob"), "{added}");
    bob.ok(&["contact", "add", "alice"]);

    let bob_listen = bob.listen();
    let (code, out) = alice.send("bob", "hello bob, it's alice");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("delivered"), "{out}");
    let m = bob_listen.expect_text("hello bob, it's alice");
    assert_eq!(m["type"], "message");
    assert_eq!(m["from_handle"], "alice");

    let alice_listen = alice.listen();
    let (code, out) = bob.send("alice", "hi alice!");
    assert_eq!(code, 0, "{out}");
    alice_listen.expect_text("hi alice!");

    // Both sides' history shows both messages, with delivery marks on the sender's side.
    for (user, with) in [(&alice, "bob"), (&bob, "alice")] {
        let h = user.history_json(with);
        let texts: Vec<&str> = h.iter().map(|m| m["text"].as_str().unwrap()).collect();
        assert_eq!(
            texts,
            ["hello bob, it's alice", "hi alice!"],
            "{}",
            user.handle
        );
        let own = h.iter().find(|m| m["outgoing"] == true).unwrap();
        assert_eq!(own["delivery"], "delivered");
    }
    // Export gives plaintext JSON Lines.
    let export = alice.ok(&["export", "bob"]);
    assert_eq!(export.lines().count(), 2);
    assert!(export.contains("hi alice!"));
    // The relay's log never contains a plaintext.
    let log = relay.log_text();
    assert!(!log.contains("hello bob"), "{log}");
    // Text from stdin works too.
    let mut child = alice
        .cmd(&["send", "bob"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"line one\nline two\n").unwrap();
    }
    assert!(child.wait().unwrap().success());
    bob_listen.expect_text("line one\nline two");
}

#[test]
fn unknown_senders_arrive_as_requests() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"));
    let (alice, bob) = alice_and_bob(dir.path(), &relay.url());
    let listen = bob.listen();
    assert_eq!(alice.send("bob", "do we know each other?").0, 0);
    let m = listen.expect_text("do we know each other?");
    assert_eq!(m["type"], "request", "{m}");
    assert_eq!(m["from_handle"], "alice");
}

#[test]
fn offline_recipient_and_outbox_across_a_relay_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = RelayProcess::start(&dir.path().join("relay"));
    let (alice, bob) = alice_and_bob(dir.path(), &relay.url());

    // Bob is not connected: the relay holds the sealed message in his mailbox (exit status 4).
    let (code, out) = alice.send("bob", "are you there?");
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("stored"), "{out}");

    // The relay goes away: the message is queued (exit status 3) and survives the process.
    relay.kill();
    let (code, out) = alice.send("bob", "written while the relay was down");
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("queued"), "{out}");
    assert!(alice.ok(&["status"]).contains("outbox:      1 waiting"));

    // The relay returns; Bob listens; Alice's long-running listener drains the outbox on
    // reconnect.
    relay.restart();
    let bob_listen = bob.listen();
    // What waited for Bob arrives first, through a relay restart (the mailbox is on disk).
    bob_listen.expect_text("are you there?");
    let alice_listen = alice.listen();
    bob_listen.expect_text("written while the relay was down");
    drop(alice_listen);
    assert!(alice.ok(&["status"]).contains("outbox:      0 waiting"));
    let h = alice.history_json("bob");
    let queued = h
        .iter()
        .find(|m| m["text"] == "written while the relay was down")
        .unwrap();
    assert_eq!(queued["delivery"], "delivered");
    let earlier = h.iter().find(|m| m["text"] == "are you there?").unwrap();
    assert_eq!(earlier["delivery"], "stored");
}

/// The strict stateless relay (`[mailbox] kind = "none"`) keeps nothing: `offline`, exit 2.
#[test]
fn a_relay_without_a_mailbox_says_offline() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start_with(
        &dir.path().join("relay"),
        &[("SYNCRA_MAILBOX__KIND", "none")],
    );
    let (alice, _bob) = alice_and_bob(dir.path(), &relay.url());
    let (code, out) = alice.send("bob", "are you there?");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("offline"), "{out}");
}

/// Bob was away; when he comes back `listen` says how many messages waited, then shows them.
#[test]
fn messages_wait_for_someone_who_is_away() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"));
    let (alice, bob) = alice_and_bob(dir.path(), &relay.url());
    bob.ok(&["contact", "add", "alice"]);
    for text in ["first", "second", "third"] {
        let (code, out) = alice.send("bob", text);
        assert_eq!(code, 4, "{out}");
    }
    let bob_listen = bob.listen();
    let deadline = Instant::now() + DEADLINE;
    let mut texts = Vec::new();
    let mut backlog = None;
    while texts.len() < 3 || backlog.is_none() {
        let line = bob_listen
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the backlog arrives");
        match line["type"].as_str() {
            Some("backlog") => backlog = line["count"].as_u64(),
            Some("message") => texts.push(line["text"].as_str().unwrap().to_owned()),
            _ => {}
        }
    }
    assert_eq!(texts, ["first", "second", "third"], "in order");
    // The Welcome that started the conversation waited too.
    assert_eq!(backlog, Some(4));
    drop(bob_listen);
    // Acknowledged once in the history: a later start shows nothing again. (The listener was
    // killed right after printing; an acknowledgement still in flight then makes the relay send
    // that entry once more, so poll until a start shows nothing.)
    let deadline = Instant::now() + DEADLINE;
    loop {
        let bob_listen = bob.listen();
        if bob_listen
            .lines
            .recv_timeout(Duration::from_millis(700))
            .is_err()
        {
            break;
        }
        assert!(Instant::now() < deadline, "the backlog never went away");
    }
    let h = bob.history_json("alice");
    assert_eq!(h.len(), 3, "each message once: {h:?}");
}

#[test]
fn listener_reconnects_after_the_relay_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = RelayProcess::start(&dir.path().join("relay"));
    let (alice, bob) = alice_and_bob(dir.path(), &relay.url());
    let bob_listen = bob.listen();
    relay.restart();
    // Bob's listener comes back by itself. Alice's message is delivered live, or held in Bob's
    // mailbox until his listener is back; either way it arrives. (Retried only while the relay
    // itself is still starting.)
    let deadline = Instant::now() + DEADLINE * 3;
    loop {
        let (code, out) = alice.send("bob", "after the restart");
        if code == 0 || code == 4 {
            break;
        }
        assert!(code == 3, "unexpected: {out}");
        assert!(Instant::now() < deadline, "bob never reconnected");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Stored while Bob's listener waited out its backoff (a slow restart under load makes it
    // a few seconds): it comes with the backlog once the listener is back.
    bob_listen.expect_text_within("after the restart", DEADLINE * 4);
}

#[test]
fn a_group_of_three_and_a_removed_member() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"));
    let (alice, bob, carol) = (
        User::new(dir.path(), "alice"),
        User::new(dir.path(), "bob"),
        User::new(dir.path(), "carol"),
    );
    for u in [&alice, &bob, &carol] {
        u.onboard(&relay.url());
    }
    alice.ok(&["contact", "add", "bob"]);
    alice.ok(&["contact", "add", "carol"]);
    // A group invitation from someone who is not a contact would be a message request.
    bob.ok(&["contact", "add", "alice"]);
    carol.ok(&["contact", "add", "alice"]);
    alice.ok(&["group", "create", "trio", "bob", "carol"]);
    let al = alice.listen();
    let bl = bob.listen();
    let cl = carol.listen();
    let (code, out) = alice.send("@trio", "hello trio");
    assert_eq!(code, 0, "{out}");
    for l in [&bl, &cl] {
        let m = l.expect_text("hello trio");
        assert_eq!(m["group"], "trio", "{m}");
    }
    // Members converge on the group: Bob can answer the group he learned from the message.
    let (code, out) = bob.send("@trio", "bob here");
    assert_eq!(code, 0, "{out}");
    cl.expect_text("bob here");
    al.expect_text("bob here");

    alice.ok(&["group", "remove", "trio", "carol"]);
    // Both learn it: the removal is an event for every member, the removed one included.
    // (Bob has no contact for carol: he sees her short id.)
    for (l, text) in [(&bl, "alice removed "), (&cl, "alice removed you")] {
        let e = l.expect("the removal", |l| l["type"] == "group_event");
        assert!(e["text"].as_str().unwrap().starts_with(text), "{e}");
    }
    assert_eq!(alice.send("@trio", "carol is gone").0, 0);
    bl.expect_text("carol is gone");
    // Carol gets nothing for it: she has no wrap, so there is nothing she could open.
    cl.expect_nothing_for(Duration::from_millis(1500));
    let carol_history = carol.history_json("@trio");
    assert!(carol_history.iter().all(|m| m["text"] != "carol is gone"));
}

#[test]
fn a_changed_key_blocks_sending_until_reverified() {
    let dir = tempfile::tempdir().unwrap();
    let relay_a = RelayProcess::start(&dir.path().join("relay-a"));
    let relay_b = RelayProcess::start(&dir.path().join("relay-b"));
    let (alice, _bob) = alice_and_bob(dir.path(), &relay_a.url());
    assert_eq!(alice.send("bob", "first").0, 4, "held in bob's mailbox");

    // On relay B, "bob" is someone else (a new install, or an impersonator the relay favours).
    let imposter = User {
        home: dir.path().join("imposter"),
        handle: "bob".into(),
    };
    imposter.onboard(&relay_b.url());
    alice.ok(&["register", "--relay", &relay_b.url(), "--handle", "alice"]);

    let (code, out) = alice.send("bob", "second");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("CHANGED"), "{out}");
    assert!(out.contains("syncra verify bob"), "{out}");
    // Still blocked on the next attempt, and `contact list` says why.
    let (code, out) = alice.send("bob", "third");
    assert_eq!(code, 1, "{out}");
    assert!(alice.ok(&["contact", "list"]).contains("KEY CHANGED"));

    // Verify shows the new identity's safety number; marking it verified unblocks sending.
    let shown = alice.ok(&["verify", "bob"]);
    assert!(shown.contains("CHANGED"), "{shown}");
    alice.ok(&["verify", "bob", "--mark-verified"]);
    let listen = imposter.listen();
    let (code, out) = alice.send("bob", "fourth");
    assert_eq!(code, 0, "{out}");
    listen.expect_text("fourth");
}

#[test]
fn wrong_passphrase_and_damaged_files_are_clear_errors_and_nothing_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"));
    let (alice, _bob) = alice_and_bob(dir.path(), &relay.url());
    alice.send("bob", "one");
    alice.send("bob", "two");
    let key = alice.home.join("identity.key");
    let key_bytes = std::fs::read(&key).unwrap();

    // Wrong passphrase.
    let out = alice
        .cmd(&["status"])
        .env("SYNCRA_PASSPHRASE", "not it")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong passphrase"));
    // A passphrase file works, and a wrong one in a file fails the same way.
    let pf = dir.path().join("pass.txt");
    std::fs::write(&pf, format!("{PASS}\n")).unwrap();
    let out = syncra()
        .env("SYNCRA_HOME", &alice.home)
        .args(["--passphrase-file", pf.to_str().unwrap(), "contact", "list"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Corrupt key file.
    std::fs::write(&key, b"{ this is not a key file").unwrap();
    let err = alice.fails(&["status"]);
    assert!(err.contains("damaged") || err.contains("corrupt"), "{err}");
    assert!(key.exists(), "the damaged key file was left in place");
    std::fs::write(&key, &key_bytes).unwrap();

    // A corrupt history line is skipped; the lines after it still show.
    let bob_id = alice
        .ok(&["contact", "list"])
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned();
    let log = alice.home.join("chats").join(format!("{bob_id}.log"));
    let original = std::fs::read_to_string(&log).unwrap();
    let mut lines: Vec<&str> = original.lines().collect();
    lines.insert(1, "garbage that is not a history line");
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();
    let h = alice.history_json("bob");
    let texts: Vec<&str> = h.iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["one", "two"]);
    assert!(
        std::fs::read_to_string(&log).unwrap().contains("garbage"),
        "not deleted"
    );

    // An unreadable SYNCRA_HOME (a file where a directory should be).
    let not_a_dir = dir.path().join("file-home");
    std::fs::write(&not_a_dir, b"x").unwrap();
    let out = syncra()
        .env("SYNCRA_HOME", &not_a_dir)
        .env("SYNCRA_PASSPHRASE", PASS)
        .args(["status"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("file-home"), "{err}");
    assert_eq!(std::fs::read(&not_a_dir).unwrap(), b"x");

    // No identity yet: a clear next step.
    let fresh = User::new(dir.path(), "nobody");
    let err = fresh.fails(&["status"]);
    assert!(err.contains("syncra init"), "{err}");
    // init refuses to overwrite.
    let err = alice.fails(&["init"]);
    assert!(err.contains("refusing to overwrite"), "{err}");
    assert_eq!(std::fs::read(&key).unwrap(), key_bytes);
}

#[test]
fn registration_errors_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"));
    let alice = User::new(dir.path(), "alice");
    alice.onboard(&relay.url());
    let other = User::new(dir.path(), "other");
    other.ok(&["init"]);
    let err = other.fails(&["register", "--relay", &relay.url(), "--handle", "alice"]);
    assert!(
        err.contains("\"alice\" is taken; pick another with --handle"),
        "{err}"
    );
    let err = other.fails(&["register", "--relay", &relay.url(), "--handle", "x"]);
    assert!(err.contains("pick another with --handle"), "{err}");
    let err = other.fails(&[
        "register",
        "--relay",
        "ws://127.0.0.1:1/",
        "--handle",
        "other",
    ]);
    assert!(
        err.contains("unreachable") || err.contains("connect"),
        "{err}"
    );
    let err = other.fails(&["contact", "add", "alice"]);
    assert!(err.contains("register"), "{err}");
}

/// The relay id is pinned at registration: a server whose challenge names another relay (one
/// that passes another relay's challenge on, or simply another relay at the configured address)
/// gets no login proof, and the person is told why.
#[test]
fn a_server_claiming_another_relay_id_gets_no_login() {
    let dir = tempfile::tempdir().unwrap();
    let relay_a =
        RelayProcess::start_with(&dir.path().join("a"), &[("SYNCRA_RELAY_ID", "relay-a")]);
    let relay_b =
        RelayProcess::start_with(&dir.path().join("b"), &[("SYNCRA_RELAY_ID", "relay-b")]);
    let alice = User::new(dir.path(), "alice");
    let bob = User::new(dir.path(), "bob");
    alice.onboard(&relay_a.url());
    bob.onboard(&relay_b.url());
    let path = alice.home.join("settings.toml");
    let settings = std::fs::read_to_string(&path).unwrap();
    assert!(settings.contains("relay_id = \"relay-a\""), "{settings}");
    std::fs::write(&path, settings.replace(&relay_a.url(), &relay_b.url())).unwrap();

    let err = alice.fails(&["contact", "add", "bob"]);
    assert!(
        err.contains("\"relay-b\"") && err.contains("refusing to log in"),
        "{err}"
    );
    // Back at its own relay, the identity logs in as before.
    std::fs::write(&path, settings).unwrap();
    alice.ok(&["status"]);
}

/// A command that waits on the network says so after a second instead of looking hung: here a
/// "relay" that accepts the connection and never answers.
#[test]
fn a_command_waiting_on_a_silent_relay_says_that_it_is_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/", silent.local_addr().unwrap());
    let alice = User::new(dir.path(), "alice");
    alice.ok(&["init"]);
    let err = alice.fails(&["register", "--relay", &url, "--handle", "alice"]);
    assert!(
        err.contains(&format!("waiting for the relay at {url}…")),
        "{err}"
    );
    assert!(err.contains("did not answer in time"), "{err}");
    drop(silent);
}

/// A group message that reached some members live and is held for others says so per member,
/// in `send` and in `history` (and the TUI shows the same words as a notice).
#[test]
fn a_group_send_says_what_happened_per_member() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"));
    let (alice, bob, carol) = (
        User::new(dir.path(), "alice"),
        User::new(dir.path(), "bob"),
        User::new(dir.path(), "carol"),
    );
    for u in [&alice, &bob, &carol] {
        u.onboard(&relay.url());
    }
    alice.ok(&["contact", "add", "bob"]);
    alice.ok(&["contact", "add", "carol"]);
    alice.ok(&["group", "create", "pair", "bob", "carol"]);
    let _bob_listens = bob.listen();
    // Carol is away: her copy waits in her mailbox.
    let (code, out) = alice.send("@pair", "who is here?");
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("delivered to 1 of 2, held for 1"), "{out}");
    let history = alice.ok(&["history", "@pair"]);
    assert!(
        history.contains("[stored: delivered to 1 of 2, held for 1]"),
        "{history}"
    );
    let json = alice.history_json("@pair");
    let sent = json.iter().find(|m| m["text"] == "who is here?").unwrap();
    assert_eq!(sent["reach"], "delivered to 1 of 2, held for 1", "{sent}");
}

/// A person can empty what the relay holds for them: `syncra mailbox clear`.
#[test]
fn a_person_empties_their_mailbox() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"));
    let (alice, bob) = alice_and_bob(dir.path(), &relay.url());
    bob.ok(&["contact", "add", "alice"]);
    assert_eq!(alice.send("bob", "never read").0, 4);
    let out = bob.ok(&["mailbox", "clear"]);
    assert!(out.contains("your mailbox at the relay is empty"), "{out}");
    // Nothing waits any more: a listener shows nothing, and the history has nothing from alice.
    let bob_listen = bob.listen();
    bob_listen.expect_nothing_for(Duration::from_millis(700));
    drop(bob_listen);
    assert!(bob.history_json("alice").is_empty());
}

/// The interface's group commands: in line mode (the same controller as the TUI) a member opens
/// the group and removes someone with `/remove`; the others see it as an event, and `/leave`
/// asks to leave.
#[test]
fn group_commands_in_the_interface_change_the_roster() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"));
    let (alice, bob, carol) = (
        User::new(dir.path(), "alice"),
        User::new(dir.path(), "bob"),
        User::new(dir.path(), "carol"),
    );
    for u in [&alice, &bob, &carol] {
        u.onboard(&relay.url());
    }
    alice.ok(&["contact", "add", "bob"]);
    alice.ok(&["contact", "add", "carol"]);
    bob.ok(&["contact", "add", "alice"]);
    carol.ok(&["contact", "add", "alice"]);
    alice.ok(&["group", "create", "trio", "bob", "carol"]);
    let bl = bob.listen();
    let cl = carol.listen();
    bl.expect("the creation", |l| l["type"] == "group_event");
    cl.expect("the creation", |l| l["type"] == "group_event");

    let (mut line, mut stdin, rx) = common::line_mode(&alice);
    let mut printed = Vec::new();
    let mut wait_for = |what: &str| {
        let deadline = Instant::now() + DEADLINE * 4;
        while !printed.iter().any(|l: &String| l.contains(what)) {
            let left = deadline.saturating_duration_since(Instant::now());
            printed.push(
                rx.recv_timeout(left)
                    .unwrap_or_else(|_| panic!("{what:?} never printed: {printed:#?}")),
            );
        }
    };
    wait_for("identity alice");
    writeln!(stdin, "{PASS}").unwrap();
    wait_for("* online");
    writeln!(stdin, "/open @trio").unwrap();
    writeln!(stdin, "/remove carol").unwrap();
    // (Bob has no contact for carol: he sees her short id.)
    let ev = bl.expect("the removal", |l| l["type"] == "group_event");
    assert!(
        ev["text"].as_str().unwrap().starts_with("alice removed "),
        "{ev}"
    );
    let ev = cl.expect("the removal", |l| l["type"] == "group_event");
    assert_eq!(ev["text"], "alice removed you", "{ev}");
    writeln!(stdin, "/quit").unwrap();
    let status = line.wait().unwrap();
    assert!(status.success(), "/quit ends line mode cleanly: {status}");
    let h = alice.history_json("@trio");
    assert!(
        h.iter()
            .any(|m| m["event"] == true && m["text"] == "you removed carol"),
        "{h:?}"
    );
    let list = bob.ok(&["group", "list"]);
    assert!(list.contains("@trio\talice, bob\t"), "{list}");
}

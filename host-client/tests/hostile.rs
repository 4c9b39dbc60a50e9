//! What a stranger, a contact and a group member can and cannot do to a client: real `syncra`
//! processes as victims, and an attacker who seals whatever content it likes with its own real
//! identity through a real `syncra-relay` (the client library, driven by hand).
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Instant;

use common::{PASS, User};
use syncra_client::keystore::KeyStore;
use syncra_client::message::{Content, GroupInfo};
use syncra_client::{Client, Home};
use syncra_core::UserId;
use syncra_core::crypto::envelope::{Recipient, seal_with_id};
use syncra_test_support::DEADLINE;
use syncra_test_support::process::RelayProcess;

/// Someone who seals content of their choosing with their own identity.
struct Forger {
    rt: tokio::runtime::Runtime,
    client: Client,
    keys: KeyStore,
}

impl Forger {
    fn new(user: &User) -> Forger {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut client = Client::open(Home::at(user.home.clone()), PASS).unwrap();
        rt.block_on(client.connect()).unwrap();
        let keys =
            KeyStore::unlock(&user.home.join("identity.key"), PASS.as_bytes(), false).unwrap();
        Forger { rt, client, keys }
    }

    fn id_of(&self, handle: &str) -> UserId {
        let session = self.client.session().unwrap();
        self.rt
            .block_on(session.lookup_handle(handle))
            .unwrap()
            .user_id
    }

    fn me(&self) -> UserId {
        self.client.user_id()
    }

    /// Seals `content` to the users with these handles and sends it.
    fn send(&self, to: &[&str], content: &Content) {
        let bytes = self.seal(to, content);
        self.send_raw(bytes);
    }

    /// Sends bytes as they are (a replay).
    fn send_raw(&self, bytes: Vec<u8>) {
        let session = self.client.session().unwrap();
        self.rt.block_on(session.send(bytes)).unwrap();
    }

    /// Seals `content` to the users with these handles.
    fn seal(&self, to: &[&str], content: &Content) -> Vec<u8> {
        let session = self.client.session().unwrap();
        let recipients: Vec<Recipient> = to
            .iter()
            .map(|h| {
                let r = self.rt.block_on(session.lookup_handle(h)).unwrap();
                Recipient {
                    user_id: r.user_id,
                    prekey: r.prekey.public,
                }
            })
            .collect();
        let mut id = [0u8; 16];
        syncra_core::crypto::fill_random(&mut id);
        let sealed = seal_with_id(
            &self.keys.identity,
            &recipients,
            &content.encode(),
            syncra_core::now_ms(),
            id,
        )
        .unwrap();
        sealed.bytes
    }
}

fn group_msg(text: &str, id: &str, name: &str, members: Vec<UserId>, creator: UserId) -> Content {
    Content {
        v: 1,
        text: text.into(),
        group: Some(GroupInfo {
            id: id.into(),
            name: name.into(),
            members,
            creator: Some(creator),
        }),
    }
}

const GID: &str = "00112233445566778899aabbccddeeff";

fn people(dir: &std::path::Path, relay: &RelayProcess, names: &[&str]) -> Vec<User> {
    names
        .iter()
        .map(|n| {
            let u = User::new(dir, n);
            u.onboard(&relay.url());
            u
        })
        .collect()
}

#[test]
fn a_hostile_group_id_is_refused_and_the_listener_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"));
    let [alice, mallory] = &people(dir.path(), &relay, &["alice", "mallory"])[..] else {
        unreachable!()
    };
    // Even a contact gets no say over file names.
    alice.ok(&["contact", "add", "mallory"]);
    let mut al = alice.listen();
    let m = Forger::new(mallory);
    let members = vec![m.id_of("alice"), m.me()];
    let long = "a".repeat(300);
    let bad_ids = ["../../../escaped", "nul\0byte", long.as_str(), "ops"];
    for (n, id) in bad_ids.iter().enumerate() {
        m.send(
            &["alice"],
            &group_msg("boom", id, "x", members.clone(), m.me()),
        );
        let line = al.expect("a rejected line", |l| l["type"] == "rejected");
        assert!(
            line["reason"]
                .as_str()
                .unwrap()
                .contains("invalid group id"),
            "{line}"
        );
        assert_eq!(line["count"], n as u64 + 1, "{line}");
    }
    m.send(&["alice"], &Content::text("still listening?"));
    al.expect_text("still listening?");
    assert!(al.is_running());
    assert!(!dir.path().join("escaped.log").exists());
    assert!(!alice.home.join("escaped.log").exists());
    assert_eq!(alice.ok(&["group", "list"]), "");
    drop(al);
    // A restarted listener is as healthy.
    let al = alice.listen();
    m.send(&["alice"], &Content::text("and after a restart?"));
    al.expect_text("and after a restart?");
}

#[test]
fn a_strangers_group_message_is_a_request_and_creates_no_group() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"));
    let [alice, mallory, eve] = &people(dir.path(), &relay, &["alice", "mallory", "eve"])[..]
    else {
        unreachable!()
    };
    let _ = eve;
    let al = alice.listen();
    let m = Forger::new(mallory);
    let members = vec![m.id_of("alice"), m.me(), m.id_of("eve")];
    m.send(
        &["alice"],
        &group_msg("join us", GID, "ops", members, m.me()),
    );
    let line = al.expect_text("join us");
    assert_eq!(line["type"], "request", "{line}");
    assert!(line["group"].is_null(), "{line}");
    assert_eq!(alice.ok(&["group", "list"]), "");
    let contacts = alice.ok(&["contact", "list"]);
    assert!(
        contacts.contains("mallory") && contacts.contains("request"),
        "{contacts}"
    );
    assert!(!contacts.contains("eve"), "{contacts}");
}

#[test]
fn at_name_resolves_only_my_own_names_never_an_id_someone_chose() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"));
    let [alice, bob, mallory] = &people(dir.path(), &relay, &["alice", "bob", "mallory"])[..]
    else {
        unreachable!()
    };
    alice.ok(&["contact", "add", "bob"]);
    alice.ok(&["contact", "add", "mallory"]);
    bob.ok(&["contact", "add", "alice"]);
    alice.ok(&["group", "create", "ops", "bob"]);
    let al = alice.listen();
    let bl = bob.listen();
    let m = Forger::new(mallory);
    let members = vec![m.id_of("alice"), m.me()];
    // A contact's group whose id is my group's name, and one whose name is my group's name.
    m.send(
        &["alice"],
        &group_msg("id ops", "ops", "ops", members.clone(), m.me()),
    );
    al.expect("the refusal", |l| l["type"] == "rejected");
    m.send(
        &["alice"],
        &group_msg("name ops", GID, "ops", members, m.me()),
    );
    let line = al.expect_text("name ops");
    assert_eq!(line["group"], "ops-2", "{line}");
    let list = alice.ok(&["group", "list"]);
    assert!(list.contains("@ops\talice, bob\t"), "{list}");
    assert!(list.contains("@ops-2\talice, mallory\t"), "{list}");
    let (code, out) = alice.send("@ops", "for ops only");
    assert_eq!(code, 0, "{out}");
    let got = bl.expect_text("for ops only");
    assert_eq!(got["group"], "ops");
    let h = alice.history_json("@ops-2");
    assert!(h.iter().all(|m| m["text"] != "for ops only"));
}

#[test]
fn only_the_creator_changes_members_every_change_is_shown_and_non_members_cannot_post() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"));
    let [alice, bob, carol, _mallory] =
        &people(dir.path(), &relay, &["alice", "bob", "carol", "mallory"])[..]
    else {
        unreachable!()
    };
    for (a, b) in [(alice, bob), (alice, carol), (bob, carol)] {
        a.ok(&["contact", "add", &b.handle]);
        b.ok(&["contact", "add", &a.handle]);
    }
    alice.ok(&["group", "create", "team", "bob", "carol"]);
    let al = alice.listen();
    let bl = bob.listen();
    let cl = carol.listen();
    assert_eq!(alice.send("@team", "hello team").0, 0);
    let gid = bl.expect_text("hello team")["group_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let created = cl.expect("the creation event", |l| l["type"] == "group_event");
    assert!(
        created["text"]
            .as_str()
            .unwrap()
            .starts_with("alice created @team"),
        "{created}"
    );
    cl.expect_text("hello team");

    // A member who is not the creator cannot change the list, neither with the CLI...
    let err = bob.fails(&["group", "add", "team", "carol"]);
    assert!(err.contains("only the creator of @team (alice)"), "{err}");
    // ...nor by sending a list of their own (claiming to be the creator changes nothing).
    let b = Forger::new(bob);
    let mut with_mallory = vec![
        b.id_of("alice"),
        b.me(),
        b.id_of("carol"),
        b.id_of("mallory"),
    ];
    b.send(
        &["alice", "carol"],
        &group_msg(
            "I added mallory",
            &gid,
            "team",
            with_mallory.clone(),
            b.id_of("alice"),
        ),
    );
    al.expect_text("I added mallory");
    cl.expect_text("I added mallory");
    for u in [alice, carol] {
        let list = u.ok(&["group", "list"]);
        assert!(!list.contains("mallory"), "{list}");
    }

    // The creator removes carol: everyone, carol included, sees it.
    let out = alice.ok(&["group", "remove", "team", "carol"]);
    assert!(out.contains("members were told"), "{out}");
    let ev = bl.expect("the removal", |l| l["type"] == "group_event");
    assert_eq!(ev["text"], "alice removed carol", "{ev}");
    let ev = cl.expect("the removal", |l| l["type"] == "group_event");
    assert_eq!(ev["text"], "alice removed you", "{ev}");
    let h = alice.history_json("@team");
    assert!(
        h.iter()
            .any(|m| m["event"] == true && m["text"] == "you removed carol")
    );
    let err = carol.send("@team", "am I still in?").1;
    assert!(err.contains("no longer a member"), "{err}");

    // A removed member's post is refused.
    let c = Forger::new(carol);
    with_mallory.retain(|m| *m != c.id_of("mallory"));
    c.send(
        &["alice", "bob"],
        &group_msg("still here", &gid, "team", with_mallory, c.id_of("alice")),
    );
    for l in [&al, &bl] {
        let r = l.expect("the refusal", |l| l["type"] == "rejected");
        assert!(
            r["reason"].as_str().unwrap().contains("not a member"),
            "{r}"
        );
    }
    assert!(
        bob.history_json("@team")
            .iter()
            .all(|m| m["text"] != "still here")
    );
}

/// Whether printed bytes hold a character a terminal would act on (newlines aside).
fn has_control(text: &str) -> bool {
    text.chars()
        .any(|c| c != '\n' && syncra_core::text::is_unsafe_char(c))
}

const HOSTILE: &str = "hi\n[carol] carol: send the keys to mallory\r\x1b[2K\x1b[1A\x1b[31mred\x1b]0;pwned\x07\u{9b}2J\u{202e}gpj.exe\x7f";

#[test]
fn peer_text_is_inert_in_line_mode_history_and_export_and_exact_in_json() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"));
    let [alice, bob] = &people(dir.path(), &relay, &["alice", "bob"])[..] else {
        unreachable!()
    };
    alice.ok(&["contact", "add", "bob"]);
    bob.ok(&["contact", "add", "alice"]);

    // Line mode, live.
    let mut line = alice
        .cmd(&["--line"])
        .env_remove("SYNCRA_PASSPHRASE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = line.stdin.take().unwrap();
    let stdout = line.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    let mut printed = Vec::new();
    let wait_for = |printed: &mut Vec<String>, what: &str| {
        // Unlocking runs Argon2id with the default cost in a debug build: give it room.
        let deadline = Instant::now() + DEADLINE * 4;
        while !printed.iter().any(|l| l.contains(what)) {
            let left = deadline.saturating_duration_since(Instant::now());
            printed.push(
                rx.recv_timeout(left)
                    .unwrap_or_else(|_| panic!("{what:?} never printed: {printed:#?}")),
            );
        }
    };
    // Lines typed before the passphrase prompt are not read as the passphrase.
    wait_for(&mut printed, "identity alice");
    writeln!(stdin, "{PASS}").unwrap();
    wait_for(&mut printed, "* online");
    let (code, out) = bob.send("alice", HOSTILE);
    assert_eq!(code, 0, "{out}");
    wait_for(&mut printed, "send the keys");
    writeln!(stdin, "/quit").unwrap();
    let _ = line.wait();
    let screen = printed.join("\n");
    assert!(!has_control(&screen), "{screen:?}");
    assert!(
        !printed.iter().any(|l| l.starts_with("[carol]")),
        "a forged line: {screen}"
    );
    assert!(
        screen.contains("hi\\n[carol] carol: send the keys"),
        "{screen}"
    );

    // `history` in text, as a person reads it.
    let h = alice.ok(&["history", "bob"]);
    assert!(!has_control(&h), "{h:?}");
    assert_eq!(h.lines().count(), 1, "{h}");
    assert!(h.contains("\\u{1b}]0;pwned\\u{7}"), "{h}");
    // JSON (history --json, export, listen): exact when parsed, inert when printed.
    for out in [
        alice.ok(&["history", "bob", "--json"]),
        alice.ok(&["export", "bob"]),
    ] {
        assert!(!has_control(&out), "{out:?}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["text"], HOSTILE);
    }
}

#[test]
fn plaintext_ws_is_refused_unless_the_relay_is_loopback_or_explicitly_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"));
    let alice = User::new(dir.path(), "alice");
    alice.ok(&["init"]);
    // `.invalid` never resolves: the refusal must come before any name is resolved.
    let err = alice.fails(&[
        "register",
        "--relay",
        "ws://relay.invalid:7443/",
        "--handle",
        "alice",
    ]);
    assert!(
        err.contains("refusing plaintext ws:// to relay.invalid"),
        "{err}"
    );
    assert!(err.contains("wss://relay.invalid/"), "{err}");
    // Explicitly allowed: it is tried (and fails to resolve), with a warning.
    let out = alice.run(&[
        "register",
        "--relay",
        "ws://relay.invalid:7443/",
        "--handle",
        "alice",
        "--insecure-plaintext",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("WARNING: connecting to relay.invalid over plaintext"),
        "{err}"
    );
    assert!(!err.contains("refusing plaintext"), "{err}");
    // Loopback is fine without it, and the flag is not saved into settings.toml.
    alice.ok(&["register", "--relay", &relay.url(), "--handle", "alice"]);
    let settings = std::fs::read_to_string(alice.home.join("settings.toml")).unwrap();
    assert!(
        settings.contains("insecure_plaintext = false"),
        "{settings}"
    );
    // A relay URL edited to a remote plaintext address is refused on every connection.
    let edited = settings.replace(&relay.url(), "ws://relay.invalid:7443/");
    std::fs::write(alice.home.join("settings.toml"), edited).unwrap();
    let status = alice.ok(&["status"]);
    assert!(status.contains("refusing plaintext ws://"), "{status}");
}

#[test]
fn a_replay_after_the_recipient_restarts_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"));
    let [alice, mallory] = &people(dir.path(), &relay, &["alice", "mallory"])[..] else {
        unreachable!()
    };
    alice.ok(&["contact", "add", "mallory"]);
    let m = Forger::new(mallory);
    let captured = m.seal(&["alice"], &Content::text("pay mallory 10"));
    let al = alice.listen();
    m.send_raw(captured.clone());
    al.expect_text("pay mallory 10");
    drop(al);
    let al = alice.listen();
    m.send_raw(captured);
    m.send(&["alice"], &Content::text("a fresh one"));
    // Lines come in order: the replay printed nothing before the fresh message.
    let next = al.lines.recv_timeout(DEADLINE).unwrap();
    assert_eq!(next["text"], "a fresh one", "{next}");
    let h = alice.history_json("mallory");
    assert_eq!(
        h.iter().filter(|m| m["text"] == "pay mallory 10").count(),
        1
    );
}

//! What a stranger, a contact and a group member can and cannot do to a client: real `syncra`
//! processes as victims, and an attacker who seals whatever content it likes with its own real
//! identity through a real `syncra-relay` (the client library, driven by hand).
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

mod common;

use std::io::Write;
use std::time::Instant;

use common::{PASS, User};
use syncra_client::keystore::KeyStore;
use syncra_client::message::{CONTENT_VERSION, Content, GroupLabel};
use syncra_client::mls::{ConversationId, Conversations};
use syncra_client::{Client, Home};
use syncra_core::UserId;
use syncra_test_support::DEADLINE;
use syncra_test_support::process::RelayProcess;

/// Someone who puts plaintext of their choosing into MLS conversations they make, with their
/// own real identity, through a real relay (the client library, driven by hand).
struct Forger {
    rt: tokio::runtime::Runtime,
    client: Client,
    keys: KeyStore,
    mls: Conversations,
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
        let mls =
            Conversations::open(&keys.identity, &user.home.join("mls"), &keys.storage).unwrap();
        Forger {
            rt,
            client,
            keys,
            mls,
        }
    }

    fn id_of(&self, handle: &str) -> UserId {
        let session = self.client.session().unwrap();
        self.rt
            .block_on(session.lookup_handle(handle))
            .unwrap()
            .user_id
    }

    /// A new conversation with the users of these handles (their KeyPackages claimed, the
    /// Welcome sent), made as a named group or as a 1:1 chat.
    fn create(&mut self, with: &[&str], group: bool) -> ConversationId {
        let ids: Vec<UserId> = with.iter().map(|h| self.id_of(h)).collect();
        let session = self.client.session().unwrap();
        let _lock = self
            .rt
            .block_on(self.mls.lock(&self.keys.identity))
            .unwrap();
        self.rt
            .block_on(self.mls.create_as(&session, &ids, group))
            .unwrap()
    }

    /// The carriage of `plaintext` in a conversation, not sent.
    fn seal(&mut self, conversation: ConversationId, plaintext: &[u8]) -> Vec<u8> {
        let _lock = self
            .rt
            .block_on(self.mls.lock(&self.keys.identity))
            .unwrap();
        self.mls.seal(conversation, plaintext).unwrap().unwrap().0
    }

    /// Sends `plaintext` in a conversation.
    fn say(&mut self, conversation: ConversationId, plaintext: &[u8]) {
        let carriage = self.seal(conversation, plaintext);
        self.send_raw(carriage).unwrap();
    }

    /// Sends a carriage as it is (a replay, a forgery); the relay's answer.
    fn send_raw(&self, carriage: Vec<u8>) -> Result<(), syncra_client::net::NetError> {
        let session = self.client.session().unwrap();
        self.rt.block_on(session.send(carriage)).map(drop)
    }
}

/// A well-formed message's plaintext.
fn content(text: &str, group: Option<&str>) -> Vec<u8> {
    let mut id = [0u8; 16];
    syncra_core::crypto::fill_random(&mut id);
    Content {
        v: CONTENT_VERSION,
        id: data_encoding::HEXLOWER.encode(&id),
        ts: syncra_core::now_ms(),
        text: text.into(),
        group: group.map(|name| GroupLabel { name: name.into() }),
    }
    .encode()
}

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

/// A contact's plaintext that is not a Syncra message, and a group name made to climb out of
/// the home: refused or made harmless, and the listener keeps running. (Group ids are the MLS
/// group's 16 bytes, written as hex: nothing a peer says becomes a file name.)
#[test]
fn hostile_plaintext_and_group_names_are_refused_or_harmless_and_the_listener_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"));
    let [alice, mallory] = &people(dir.path(), &relay, &["alice", "mallory"])[..] else {
        unreachable!()
    };
    alice.ok(&["contact", "add", "mallory"]);
    let mut al = alice.listen();
    let mut m = Forger::new(mallory);
    let chat = m.create(&["alice"], false);
    let long = format!("{{\"v\":2,\"id\":\"{}\"}}", "a".repeat(300));
    let bad: [&[u8]; 4] = [
        b"not json at all",
        br#"{"v":1,"text":"an envelope-era body"}"#,
        br#"{"v":2,"id":"../../../escaped","ts":1,"text":"boom"}"#,
        long.as_bytes(),
    ];
    for (n, plaintext) in bad.iter().enumerate() {
        m.say(chat, plaintext);
        let line = al.expect("a rejected line", |l| l["type"] == "rejected");
        assert!(
            line["reason"]
                .as_str()
                .unwrap()
                .contains("not a Syncra message"),
            "{line}"
        );
        assert_eq!(line["count"], n as u64 + 1, "{line}");
    }
    m.say(chat, &content("still listening?", None));
    al.expect_text("still listening?");
    assert!(al.is_running());

    let group = m.create(&["alice"], true);
    m.say(group, &content("boom", Some("../../../escaped")));
    let line = al.expect_text("boom");
    assert_eq!(line["group"], "escaped", "{line}");
    assert!(!dir.path().join("escaped.log").exists());
    assert!(!alice.home.join("escaped.log").exists());
    drop(al);
    // A restarted listener is as healthy.
    let al = alice.listen();
    m.say(chat, &content("and after a restart?", None));
    al.expect_text("and after a restart?");
}

#[test]
fn a_strangers_group_message_is_a_request_and_creates_no_group() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"));
    let [alice, mallory, _eve] = &people(dir.path(), &relay, &["alice", "mallory", "eve"])[..]
    else {
        unreachable!()
    };
    let al = alice.listen();
    let mut m = Forger::new(mallory);
    let group = m.create(&["alice", "eve"], true);
    m.say(group, &content("join us", Some("ops")));
    let line = al.expect_text("join us");
    assert_eq!(line["type"], "request", "{line}");
    assert!(line["group"].is_null(), "{line}");
    assert_eq!(alice.ok(&["group", "list"]), "");
    let contacts = alice.ok(&["contact", "list"]);
    assert!(
        contacts.contains("mallory") && contacts.contains("request"),
        "{contacts}"
    );
    // By name, the first column: a random user id can contain the letters "eve".
    assert!(
        !contacts
            .lines()
            .any(|l| l.split('\t').next() == Some("eve")),
        "{contacts}"
    );
}

#[test]
fn at_name_resolves_only_my_own_names_never_a_name_someone_chose() {
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
    let mut m = Forger::new(mallory);
    // A contact's group named like my group.
    let group = m.create(&["alice"], true);
    m.say(group, &content("name ops", Some("ops")));
    let line = al.expect_text("name ops");
    assert_eq!(line["group"], "ops-2", "{line}");
    let list = alice.ok(&["group", "list"]);
    assert!(list.contains("@ops\talice, bob\t"), "{list}");
    assert!(list.contains("@ops-2\tmallory, alice\t"), "{list}");
    let (code, out) = alice.send("@ops", "for ops only");
    assert_eq!(code, 0, "{out}");
    let got = bl.expect_text("for ops only");
    assert_eq!(got["group"], "ops");
    let h = alice.history_json("@ops-2");
    assert!(h.iter().all(|m| m["text"] != "for ops only"));
}

/// Membership is the MLS roster: any member may add or remove, every member (the removed one
/// included) sees the change as an event, and someone outside the group cannot post to it —
/// the relay refuses it (`not_a_member`), and what it let through no member could open.
#[test]
fn members_change_the_roster_every_change_is_shown_and_non_members_cannot_post() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"));
    let [alice, bob, carol, mallory] =
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

    // Bob (a member, not the creator) removes carol: everyone, carol included, sees it.
    let out = bob.ok(&["group", "remove", "team", "carol"]);
    assert!(out.contains("now has 2 members"), "{out}");
    let ev = al.expect("the removal", |l| l["type"] == "group_event");
    assert_eq!(ev["text"], "bob removed carol", "{ev}");
    let ev = cl.expect("the removal", |l| l["type"] == "group_event");
    assert_eq!(ev["text"], "bob removed you", "{ev}");
    let h = bob.history_json("@team");
    assert!(
        h.iter()
            .any(|m| m["event"] == true && m["text"] == "you removed carol")
    );
    for u in [alice, bob] {
        let list = u.ok(&["group", "list"]);
        assert!(!list.contains("carol"), "{list}");
    }
    let list = carol.ok(&["group", "list"]);
    assert!(
        list.contains("@team\t(you are no longer a member)"),
        "{list}"
    );
    let err = carol.send("@team", "am I still in?").1;
    assert!(err.contains("no longer a member"), "{err}");
    assert_eq!(alice.send("@team", "carol is gone").0, 0);
    bl.expect_text("carol is gone");
    cl.expect_nothing_for(std::time::Duration::from_millis(1500));

    // Someone outside the group posts to it (their own MLS message under its group id).
    let mut m = Forger::new(mallory);
    let theirs = m.create(&["alice"], true);
    let mut forged = m.seal(theirs, &content("let me in", Some("team")));
    let gid = ConversationId::from_hex(&gid).unwrap();
    forged[18..34].copy_from_slice(gid.as_bytes());
    let refused = m.send_raw(forged).unwrap_err();
    assert!(refused.to_string().contains("not_a_member"), "{refused}");
    for u in [alice, bob] {
        assert!(
            u.history_json("@team")
                .iter()
                .all(|m| m["text"] != "let me in")
        );
    }
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
    let (mut line, mut stdin, rx) = common::line_mode(alice);
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
    let status = line.wait().unwrap();
    assert!(status.success(), "/quit ends line mode cleanly: {status}");
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
    let mut m = Forger::new(mallory);
    let chat = m.create(&["alice"], false);
    let captured = m.seal(chat, &content("pay mallory 10", None));
    let al = alice.listen();
    m.send_raw(captured.clone()).unwrap();
    al.expect_text("pay mallory 10");
    drop(al);
    let al = alice.listen();
    // The relay routes it again (it is in the group's current epoch); MLS refuses it.
    m.send_raw(captured).unwrap();
    m.say(chat, &content("a fresh one", None));
    // Lines come in order: the replay printed nothing before the fresh message.
    let next = al.lines.recv_timeout(DEADLINE).unwrap();
    assert_eq!(next["text"], "a fresh one", "{next}");
    let h = alice.history_json("mallory");
    assert_eq!(
        h.iter().filter(|m| m["text"] == "pay mallory 10").count(),
        1
    );
}

//! The client library against an in-process relay: prekey rotation on schedule, replays
//! shown once, tampered deliveries reported, history at rest.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use syncra_client::keystore::KeyStore;
use syncra_client::net::Push;
use syncra_client::{Client, Home, Incoming, InitOptions, SendState};
use syncra_core::crypto::keyfile::KdfParams;
use syncra_test_relay::TestRelay;
use syncra_test_support::DEADLINE;

const PASS: &str = "pw for tests";

fn options() -> InitOptions {
    InitOptions {
        kdf: KdfParams::MINIMUM,
    }
}

async fn user(dir: &std::path::Path, relay: &TestRelay, handle: &str) -> Client {
    let mut c = Client::init(Home::at(dir.join(handle)), PASS, options()).unwrap();
    c.register(relay.url(), handle).await.unwrap();
    c
}

async fn next_delivery(rx: &mut tokio::sync::mpsc::Receiver<Push>) -> Vec<u8> {
    loop {
        match tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .unwrap()
            .unwrap()
        {
            Push::Deliver(e) | Push::Pending(_, e) => return e.to_vec(),
            Push::Notice(..) | Push::BacklogDone { .. } => continue,
        }
    }
}

/// Receives deliveries (a Welcome first, for a new conversation) until one is a message to
/// show; answers it and the carriage it came in.
async fn next_message(
    client: &mut Client,
    rx: &mut tokio::sync::mpsc::Receiver<Push>,
) -> (Incoming, Vec<u8>) {
    loop {
        let carriage = next_delivery(rx).await;
        if let Some(incoming) = client.receive(&carriage).await.unwrap() {
            return (incoming, carriage);
        }
    }
}

#[tokio::test]
async fn an_overdue_prekey_is_rotated_published_and_the_old_one_kept_for_grace() {
    let relay = TestRelay::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let home = Home::at(dir.path().join("bob"));
    home.ensure().unwrap();
    // A key file whose prekey is 8 days old.
    let eight_days_ago = syncra_core::now_ms() / 1000 - 8 * 24 * 3600;
    let mut ks = KeyStore::create(PASS.as_bytes(), KdfParams::MINIMUM, eight_days_ago).unwrap();
    let old_prekey = *ks.ring.current().public();
    ks.save(&home.key_file()).unwrap();
    let mut bob = Client::open(home.clone(), PASS).unwrap();
    bob.register(relay.url(), "bob").await.unwrap();
    bob.disconnect().await;

    // The next connection rotates and publishes.
    let mut bob = Client::open(home.clone(), PASS).unwrap();
    bob.connect().await.unwrap();
    let mut alice = user(dir.path(), &relay, "alice").await;
    let record = alice.session().unwrap().lookup_handle("bob").await.unwrap();
    assert_ne!(
        record.prekey.public, old_prekey,
        "the relay has the new prekey"
    );
    // The old private prekey is still in the key file (grace period), the new one too.
    let ks = KeyStore::unlock(&home.key_file(), PASS.as_bytes(), false).unwrap();
    assert!(ks.ring.find(&old_prekey).is_some());
    assert_eq!(ks.ring.current().public(), &record.prekey.public);

    // Conversations go on (the rotation also refreshed bob's MLS leaves).
    alice.add_contact("bob").await.unwrap();
    let mut pushes = bob.take_pushes().unwrap();
    let report = alice.send_text("bob", "after rotation").await.unwrap();
    assert_eq!(report.state, SendState::Delivered);
    match next_message(&mut bob, &mut pushes).await.0 {
        Incoming::Message { text, .. } => assert_eq!(text, "after rotation"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_duplicate_delivery_is_shown_once_and_a_tampered_one_is_reported() {
    let relay = TestRelay::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let mut alice = user(dir.path(), &relay, "alice").await;
    let mut bob = user(dir.path(), &relay, "bob").await;
    alice.add_contact("bob").await.unwrap();
    let mut pushes = bob.take_pushes().unwrap();
    alice.send_text("bob", "only once").await.unwrap();
    let (first, env) = next_message(&mut bob, &mut pushes).await;
    assert!(matches!(first, Incoming::Message { .. }), "{first:?}");
    // The same carriage again (a replay): MLS has used its key; nothing to show.
    assert_eq!(bob.receive(&env).await.unwrap(), None);
    assert_eq!(bob.history_of("alice", None).unwrap().len(), 1);

    // A fresh message altered on the way is reported, and the genuine one still opens.
    alice.send_text("bob", "the genuine one").await.unwrap();
    let genuine = next_delivery(&mut pushes).await;
    let mut tampered = genuine.clone();
    let last = tampered.len() - 3;
    tampered[last] ^= 0x20;
    let refused = bob.receive(&tampered).await.unwrap();
    assert!(
        matches!(&refused, Some(Incoming::Rejected { reason }) if reason.contains("tampered")),
        "{refused:?}"
    );
    assert_eq!(bob.rejected_count(), 1);
    match bob.receive(&genuine).await.unwrap() {
        Some(Incoming::Message { text, .. }) => assert_eq!(text, "the genuine one"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn history_is_unreadable_without_the_passphrase() {
    let relay = TestRelay::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let mut alice = user(dir.path(), &relay, "alice").await;
    let _bob = user(dir.path(), &relay, "bob").await;
    alice.add_contact("bob").await.unwrap();
    alice.send_text("bob", "a secret plan").await.unwrap();
    for entry in walk(dir.path()) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !bytes.windows(13).any(|w| w == b"a secret plan"),
            "plaintext found in {}",
            entry.display()
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Forward secrecy does not depend on reconnecting: a long-running session rotates its prekey
/// when it falls due, on a timer, and publishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_running_session_rotates_its_prekey_on_a_timer() {
    let relay = TestRelay::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let home = Home::at(dir.path().join("bob"));
    home.ensure().unwrap();
    // A prekey that falls due (7 days, the default period) three seconds from now: not due when
    // the session connects, due while it runs.
    let almost = syncra_core::now_ms() / 1000 - 7 * 24 * 3600 + 3;
    let mut ks = KeyStore::create(PASS.as_bytes(), KdfParams::MINIMUM, almost).unwrap();
    let old_prekey = *ks.ring.current().public();
    ks.save(&home.key_file()).unwrap();
    let mut bob = Client::open(home.clone(), PASS).unwrap();
    bob.register(relay.url(), "bob").await.unwrap();

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(async move {
        let stop = async {
            let _ = stop_rx.await;
        };
        let mut serve = syncra_client::client::Serve::new(&mut bob, stop)
            .unwrap()
            .check_keys_every(std::time::Duration::from_millis(200));
        while serve.next(&mut bob).await.is_some() {}
    });
    let alice = user(dir.path(), &relay, "alice").await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let record = alice.session().unwrap().lookup_handle("bob").await.unwrap();
        if record.prekey.public != old_prekey {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the running session never rotated its prekey"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let _ = stop_tx.send(());
    serving.await.unwrap();
    let ks = KeyStore::unlock(&home.key_file(), PASS.as_bytes(), false).unwrap();
    assert!(
        ks.ring.find(&old_prekey).is_some(),
        "kept for its grace period"
    );
}

/// A relay whose per-user and per-address message budgets a test's bursts do not reach.
async fn relay_without_send_limits() -> TestRelay {
    TestRelay::start(|c| {
        c.limits.messages_per_second_per_user = 100_000;
        c.limits.message_burst_per_user = 100_000;
        c.limits.messages_per_second_per_address = 100_000;
        c.limits.message_burst_per_address = 100_000;
    })
    .await
}

/// Alice sends "m0" … to bob, who is away: each is stored in his mailbox.
async fn store_for_bob(alice: &mut Client, n: usize) {
    for i in 0..n {
        let report = alice.send_text("bob", &format!("m{i}")).await.unwrap();
        assert_eq!(report.state, SendState::Stored, "m{i}");
    }
}

/// A one-shot command (nobody reads the session's pushes) of someone with a mailbox backlog
/// larger than the push channel is not stalled: its requests are still answered, and the
/// unread entries stay at the relay for the next login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_shot_session_with_a_large_backlog_is_not_stalled() {
    let relay = relay_without_send_limits().await;
    let dir = tempfile::tempdir().unwrap();
    let mut alice = user(dir.path(), &relay, "alice").await;
    let mut bob = user(dir.path(), &relay, "bob").await;
    bob.disconnect().await;
    alice.add_contact("bob").await.unwrap();
    store_for_bob(&mut alice, 1100).await;
    bob.connect().await.unwrap();
    let (contact, _) = tokio::time::timeout(DEADLINE, bob.add_contact("alice"))
        .await
        .expect("the one-shot session is not stalled by its backlog")
        .unwrap();
    assert_eq!(contact.handle, "alice");
}

/// A long-running session whose login brings a backlog larger than the deliveries channel
/// reads it before anything that waits for an answer: before, connecting stocked the
/// KeyPackage directory and drained the outbox first, each request's answer sat behind the
/// backlog the loop was not reading, and nothing was shown until the request timed out (15 s
/// each). Now every message comes, in order, then the backlog's count, then `Connected` once
/// the key upkeep and the outbox are done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serving_session_reads_a_large_backlog_before_it_waits_for_answers() {
    use syncra_client::client::{Serve, ServeEvent};
    let relay = relay_without_send_limits().await;
    let dir = tempfile::tempdir().unwrap();
    let mut alice = user(dir.path(), &relay, "alice").await;
    let mut bob = user(dir.path(), &relay, "bob").await;
    alice.add_contact("bob").await.unwrap();
    bob.add_contact("alice").await.unwrap();
    bob.disconnect().await;
    const N: usize = 1100;
    store_for_bob(&mut alice, N).await;

    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(async move {
        let stop = async {
            let _ = stop_rx.await;
        };
        let mut serve = Serve::new(&mut bob, stop).unwrap();
        while let Some(event) = serve.next(&mut bob).await {
            let _ = events_tx.send(event);
        }
    });
    let mut texts = Vec::new();
    let mut backlog = None;
    loop {
        let event = tokio::time::timeout(DEADLINE, events.recv())
            .await
            .unwrap_or_else(|_| panic!("stalled after {} messages", texts.len()))
            .unwrap();
        match event {
            ServeEvent::Incoming(Incoming::Message { text, .. }) => {
                assert!(backlog.is_none(), "{text} after the backlog's end");
                texts.push(text);
            }
            ServeEvent::Backlog(count) => backlog = Some(count),
            ServeEvent::Connected { sent } => {
                assert_eq!(sent, 0);
                break;
            }
            _ => {}
        }
    }
    let expected: Vec<String> = (0..N).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, expected, "every message, in order, before Connected");
    assert!(
        backlog.is_some_and(|n| n as usize >= N),
        "the backlog's end came before Connected: {backlog:?}"
    );
    let _ = stop_tx.send(());
    serving.await.unwrap();
}

/// A relay without a mailbox sends no `PendingEnd`: a serving session that hears nothing after
/// logging in takes its backlog to be over and comes online, sending what waited in its outbox
/// (it would otherwise wait for the catch-up's 60 s limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serving_session_on_a_relay_without_a_mailbox_comes_online() {
    use syncra_client::client::{Serve, ServeEvent};
    let relay = TestRelay::start(|c| c.mailbox = serde_json::json!({ "kind": "none" })).await;
    let dir = tempfile::tempdir().unwrap();
    let mut bob = user(dir.path(), &relay, "bob").await;
    bob.disconnect().await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let serving = tokio::spawn(async move {
        let stop = async {
            let _ = stop_rx.await;
        };
        let mut serve = Serve::new(&mut bob, stop).unwrap();
        while let Some(event) = serve.next(&mut bob).await {
            let _ = events_tx.send(event);
        }
    });
    loop {
        let event = tokio::time::timeout(DEADLINE, events.recv())
            .await
            .expect("online without a PendingEnd")
            .unwrap();
        if let ServeEvent::Connected { sent } = event {
            assert_eq!(sent, 0);
            break;
        }
    }
    let _ = stop_tx.send(());
    serving.await.unwrap();
}

/// The pushes of every connection share one channel, so a connection that closed can leave its
/// backlog's end to be read after the next login: it ends nothing of the new catch-up, the new
/// connection's own end does. (Before, any `PendingEnd` read while connected ended it: after a
/// relay restart in the middle of a large backlog, the client came online with the new login's
/// backlog unread and its requests waited behind it.) And a connection that goes while the
/// loop is busy is `Closed` — a retry after a backoff, said with `Disconnected` — not an
/// immediate new login that skips both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_end_left_by_a_closed_connection_ends_no_catch_up() {
    use syncra_client::client::{Serve, ServeEvent, Wake};
    let relay = TestRelay::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let mut bob = user(dir.path(), &relay, "bob").await;
    bob.disconnect().await;
    let mut serve = Serve::new(&mut bob, std::future::pending::<()>()).unwrap();
    serve.handle(&mut bob, Wake::Connect).await;
    let first = bob.session().unwrap().connection;
    // The connection goes while the loop is doing something else.
    bob.disconnect().await;
    let wake = serve.wait(bob.session(), bob.is_connected()).await;
    assert!(matches!(wake, Wake::Closed), "{wake:?}");
    serve.handle(&mut bob, wake).await;
    assert!(
        serve
            .take_events()
            .any(|e| matches!(e, ServeEvent::Disconnected { .. }))
    );
    serve.handle(&mut bob, Wake::Connect).await;
    let second = bob.session().unwrap().connection;
    assert_ne!(first, second);
    let connected = |serve: &mut Serve<std::future::Pending<()>>| {
        serve
            .take_events()
            .any(|e| matches!(e, ServeEvent::Connected { .. }))
    };
    let end_of = |connection| {
        Wake::Push(Push::BacklogDone {
            count: 0,
            connection,
        })
    };
    serve.handle(&mut bob, end_of(first)).await;
    assert!(
        !connected(&mut serve),
        "online on the first connection's end"
    );
    serve.handle(&mut bob, end_of(second)).await;
    assert!(
        connected(&mut serve),
        "not online on its own connection's end"
    );
}

/// A relay whose identity store is a PostgreSQL server of the test's own (to freeze).
async fn relay_on_postgres() -> (syncra_test_support::postgres::PostgresServer, TestRelay) {
    let pg = syncra_test_support::postgres::PostgresServer::start();
    let url = pg.url();
    let relay = TestRelay::start(|c| {
        c.store = serde_json::json!({ "kind": "postgres", "url": url });
    })
    .await;
    (pg, relay)
}

/// A stranger's message waits for the lookup of their handle after MLS opened it (its key is
/// used: that copy never opens again). The process dies in that window — here the lookups hang
/// on the relay's frozen PostgreSQL store and the serving task is aborted — and the message is
/// not lost: it was kept sealed in `spool/`, and the next start files it (as a message request,
/// under the sender's short id until the handle is known). Before the spool, this lost it; and
/// until 2026-12-07 a second message of the same sender, waiting behind the first, was kept in
/// memory only and lost too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_waiting_for_its_senders_lookup_survives_a_crash() {
    use syncra_client::client::{Serve, ServeEvent};
    let (mut pg, relay) = relay_on_postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let mut bob = user(dir.path(), &relay, "bob").await;
    let mut alice = user(dir.path(), &relay, "alice").await;
    let mut stranger = user(dir.path(), &relay, "stranger").await;
    bob.add_contact("alice").await.unwrap();
    alice.add_contact("bob").await.unwrap();
    stranger.add_contact("bob").await.unwrap();
    let stranger_id = stranger.user_id();
    // Delivered live to bob's session (no mailbox copy will come again).
    let report = stranger.send_text("bob", "do not lose me").await.unwrap();
    assert_eq!(report.state, SendState::Delivered);
    // A second one waits behind the first (before, only the first was kept on disk).
    let report = stranger.send_text("bob", "nor me").await.unwrap();
    assert_eq!(report.state, SendState::Delivered);
    let report = alice.send_text("bob", "from a contact").await.unwrap();
    assert_eq!(report.state, SendState::Delivered);
    pg.pause();

    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let serving = tokio::spawn(async move {
        let mut serve = Serve::new(&mut bob, std::future::pending::<()>()).unwrap();
        while let Some(event) = serve.next(&mut bob).await {
            if let ServeEvent::Incoming(Incoming::Message { text, .. }) = event {
                let _ = events_tx.send(text);
            }
        }
    });
    // The contact's message is shown while the stranger's waits for its lookup...
    let text = tokio::time::timeout(DEADLINE, events.recv())
        .await
        .expect("the contact's message")
        .unwrap();
    assert_eq!(text, "from a contact");
    // ...and the process dies.
    serving.abort();
    let _ = serving.await;
    let spooled = std::fs::read_dir(dir.path().join("bob").join("spool"))
        .unwrap()
        .count();
    assert_eq!(spooled, 2, "the waiting messages are on disk");
    pg.resume();

    let bob = Client::open(Home::at(dir.path().join("bob")), PASS).unwrap();
    let conversation = syncra_client::Target::Direct(stranger_id).conversation();
    let filed: Vec<String> = bob
        .history()
        .read(&conversation)
        .unwrap()
        .0
        .into_iter()
        .map(|m| m.text)
        .collect();
    assert_eq!(filed, ["do not lose me", "nor me"]);
    assert_eq!(
        std::fs::read_dir(dir.path().join("bob").join("spool"))
            .unwrap()
            .count(),
        0,
        "filed, then removed"
    );
    // A second start files nothing twice.
    drop(bob);
    let bob = Client::open(Home::at(dir.path().join("bob")), PASS).unwrap();
    assert_eq!(bob.history().read(&conversation).unwrap().0.len(), 2);
}

/// No head-of-line blocking on receive: messages from strangers (each needs a directory lookup
/// to learn the sender's handle) do not hold up a contact's message. The directory is made to
/// hang for real — the relay's PostgreSQL identity store is frozen (SIGSTOP) after the messages
/// reached bob's session and before bob reads them — so every lookup waits for the relay's
/// store timeout; the contact's message, sent last, is shown first, and the strangers' messages
/// follow, none lost, once the lookups end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_senders_do_not_hold_up_a_contact() {
    use syncra_client::client::{Serve, ServeEvent};
    let (mut pg, relay) = relay_on_postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let mut bob = user(dir.path(), &relay, "bob").await;
    let mut alice = user(dir.path(), &relay, "alice").await;
    bob.add_contact("alice").await.unwrap();
    alice.add_contact("bob").await.unwrap();
    let mut strangers = Vec::new();
    for i in 0..3 {
        let mut s = user(dir.path(), &relay, &format!("stranger{i}")).await;
        s.add_contact("bob").await.unwrap();
        strangers.push(s);
    }
    // Bob is connected and nobody reads his deliveries yet: they wait in his session.
    for (n, s) in strangers.iter_mut().enumerate() {
        let report = s.send_text("bob", &format!("hi {n}")).await.unwrap();
        assert_eq!(report.state, SendState::Delivered);
    }
    let report = alice.send_text("bob", "from a contact").await.unwrap();
    assert_eq!(report.state, SendState::Delivered);
    pg.pause();

    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(async move {
        let stop = async {
            let _ = stop_rx.await;
        };
        let mut serve = Serve::new(&mut bob, stop).unwrap();
        while let Some(event) = serve.next(&mut bob).await {
            if let ServeEvent::Incoming(Incoming::Message {
                from_name,
                text,
                request,
                ..
            }) = event
            {
                let _ = events_tx.send((from_name, text, request));
            }
        }
    });

    // Shown while every stranger's lookup still waits on the frozen store.
    let (from, text, request) = tokio::time::timeout(DEADLINE, events.recv())
        .await
        .expect("the contact's message was held up behind the strangers' lookups")
        .unwrap();
    assert_eq!(
        (from.as_str(), text.as_str(), request),
        ("alice", "from a contact", false)
    );

    pg.resume();
    let mut rest = Vec::new();
    while rest.len() < strangers.len() {
        let (_, text, request) = tokio::time::timeout(DEADLINE, events.recv())
            .await
            .expect("a stranger's message was lost")
            .unwrap();
        assert!(request, "a stranger's first message is a request");
        rest.push(text);
    }
    rest.sort();
    assert_eq!(rest, ["hi 0", "hi 1", "hi 2"]);
    let _ = stop_tx.send(());
    serving.await.unwrap();
}

/// At the bound on messages waiting for their senders' lookups (here 2; `MAX_PARKED`), nothing
/// waits more and nothing is lost: a sender whose next message finds the bound reached has what
/// it has waiting filed at once without its lookup (under its short id), in order, then that
/// message; a new sender at the bound is filed at once. The relay's store is frozen throughout,
/// so every lookup hangs; what did wait comes out when it thaws.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_bound_on_waiting_messages_they_are_filed_in_order_and_none_is_lost() {
    use syncra_client::client::{Serve, ServeEvent};
    let (mut pg, relay) = relay_on_postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let mut bob = user(dir.path(), &relay, "bob").await;
    let mut strangers = Vec::new();
    for i in 0..3 {
        let mut s = user(dir.path(), &relay, &format!("stranger{i}")).await;
        s.add_contact("bob").await.unwrap();
        strangers.push(s);
    }
    // Bob is connected and nobody reads his deliveries yet: they wait in his session, in the
    // order they were sent.
    for (who, text) in [(1, "b0"), (0, "a0"), (0, "a1"), (0, "a2"), (2, "c0")] {
        let report = strangers[who].send_text("bob", text).await.unwrap();
        assert_eq!(report.state, SendState::Delivered, "{text}");
    }
    pg.pause();

    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(async move {
        let stop = async {
            let _ = stop_rx.await;
        };
        let mut serve = Serve::new(&mut bob, stop).unwrap().max_parked(2);
        while let Some(event) = serve.next(&mut bob).await {
            if let ServeEvent::Incoming(Incoming::Message { text, request, .. }) = event {
                let _ = events_tx.send((text, request));
            }
        }
    });
    let mut next = async || {
        tokio::time::timeout(DEADLINE, events.recv())
            .await
            .expect("a message in time")
            .unwrap()
    };
    // b0 and a0 wait (the bound); a1 finds it reached: a0 then a1 are filed. a2 waits in the
    // room a0 left; c0 finds the bound reached and is filed at once. All while the store is
    // frozen.
    for text in ["a0", "a1", "c0"] {
        assert_eq!(next().await, (text.to_owned(), true));
    }
    pg.resume();
    let mut rest = vec![next().await, next().await];
    rest.sort();
    assert_eq!(rest, [("a2".to_owned(), true), ("b0".to_owned(), true)]);
    let _ = stop_tx.send(());
    serving.await.unwrap();
    assert_eq!(events.recv().await, None, "no message twice");
    let spool = dir.path().join("bob").join("spool");
    let left = std::fs::read_dir(&spool).map_or(0, |d| d.count());
    assert_eq!(left, 0, "nothing is left waiting on disk");
}

/// A text over the limit for one message is refused with a clear error before anything is
/// written: it could never leave the outbox, and would hold up what is typed after it.
#[tokio::test]
async fn a_text_over_the_limit_is_refused_before_the_outbox() {
    let relay = TestRelay::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let mut alice = user(dir.path(), &relay, "alice").await;
    let _bob = user(dir.path(), &relay, "bob").await;
    alice.add_contact("bob").await.unwrap();
    let long = "x".repeat(syncra_core::ui::MAX_MESSAGE_TEXT + 1);
    // Under the limit in bytes, but six times larger once encoded (control characters).
    let controls = "\u{1}".repeat(syncra_core::ui::MAX_MESSAGE_TEXT / 2);
    for text in [long, controls] {
        match alice.send_text("bob", &text).await {
            Err(syncra_client::client::ClientError::Invalid(why)) => {
                assert!(why.contains("limit"), "{why}")
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(alice.outbox_len(), 0);
    assert!(alice.history_of("bob", None).unwrap().is_empty());
    let fits = "x".repeat(syncra_core::ui::MAX_MESSAGE_TEXT);
    let sent = alice.send_text("bob", &fits).await.unwrap();
    assert_eq!(sent.state, SendState::Delivered, "{sent:?}");
}

/// The relay's mailbox backend goes down while the recipient is away: the relay answers
/// `rejected: mailbox_unavailable`, which may pass. The message stays in the sender's outbox
/// (before, only `broker_unavailable` and `rate_limited` kept it: this one was marked failed
/// and removed, lost although docs/PROTOCOL.md §2.6 promised a retry), and goes out once the
/// backend is back; the recipient reads both messages, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_refused_while_the_mailbox_is_down_stays_in_the_outbox() {
    let mut redis = syncra_test_support::servers::RedisServer::start_durable();
    let url = redis.url();
    let relay = TestRelay::start(|c| {
        c.mailbox = serde_json::json!({ "kind": "redis", "url": url });
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut alice = user(dir.path(), &relay, "alice").await;
    let mut bob = user(dir.path(), &relay, "bob").await;
    alice.add_contact("bob").await.unwrap();
    bob.disconnect().await;
    drop(bob);

    let first = alice.send_text("bob", "while it works").await.unwrap();
    assert_eq!(first.state, SendState::Stored, "{first:?}");
    redis.stop();
    let second = alice.send_text("bob", "while it is down").await.unwrap();
    assert!(
        matches!(&second.state, SendState::Queued(why) if why.contains("mailbox")),
        "{second:?}"
    );
    assert_eq!(alice.outbox_len(), 1, "kept for another try");

    redis.restart();
    let deadline = tokio::time::Instant::now() + DEADLINE * 3;
    loop {
        let sent = alice.drain_outbox().await.unwrap();
        if sent.iter().any(|r| r.state == SendState::Stored) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never stored once the mailbox was back: {sent:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(alice.outbox_len(), 0);

    let mut bob = Client::open(Home::at(dir.path().join("bob")), PASS).unwrap();
    let mut pushes = bob.take_pushes().unwrap();
    bob.connect().await.unwrap();
    let mut texts = Vec::new();
    while texts.len() < 2 {
        if let (Incoming::Message { text, .. }, _) = next_message(&mut bob, &mut pushes).await {
            texts.push(text);
        }
    }
    assert_eq!(texts, ["while it works", "while it is down"]);
}

//! The offline mailbox against real `syncra-relay` processes: a message to someone who is not
//! connected is answered `stored` and arrives first, in order, when they log in (on any node);
//! it leaves the mailbox only when acknowledged; it survives the relay being killed right after
//! the answer; quotas refuse with `mailbox_full`; `[mailbox] kind = "none"` keeps the strict
//! stateless relay.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use std::time::Duration;

use bytes::Bytes;
use syncra_core::wire::{ErrorCode, Frame, Outcome};
use syncra_test_relay::{RawClient, Received, TestUser, expect_auth_ok, http_get};
use syncra_test_support::DEADLINE;
use syncra_test_support::process::{RelayProcess, free_port};
use syncra_test_support::servers::RedisServer;

/// Logs in and reads the mailbox backlog up to `PendingEnd`: (entry id, envelope) in order.
async fn login_backlog(user: &TestUser, url: &str) -> (RawClient, Vec<(u64, Bytes)>) {
    let mut c = RawClient::connect(url).await;
    c.send(&user.auth_frame(&c)).await;
    expect_auth_ok(&mut c, user.id()).await;
    let mut entries = Vec::new();
    loop {
        match c.frame().await {
            Frame::Pending { entry_id, envelope } => entries.push((entry_id, envelope)),
            Frame::PendingEnd { count } => {
                assert_eq!(
                    count as usize,
                    entries.len(),
                    "PendingEnd counts the backlog"
                );
                return (c, entries);
            }
            other => panic!("expected the backlog, got {other:?}"),
        }
    }
}

async fn send(c: &mut RawClient, id: u32, from: &TestUser, to: &TestUser, body: &[u8]) -> Outcome {
    c.send_envelope(id, from.seal(&[to], body)).await[0].outcome
}

/// A relay process with its admin endpoint on, so tests can wait for sessions to end.
struct Relay {
    process: RelayProcess,
    admin: std::net::SocketAddr,
}

impl Relay {
    fn start(dir: &std::path::Path, env: &[(&str, &str)]) -> Relay {
        let admin: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let admin_s = admin.to_string();
        let mut all = vec![("SYNCRA_ADMIN_LISTEN", admin_s.as_str())];
        all.extend_from_slice(env);
        Relay {
            process: RelayProcess::start_with(dir, &all),
            admin,
        }
    }

    fn url(&self) -> String {
        self.process.url()
    }

    /// Waits until the relay holds exactly `n` sessions (a closed connection is noticed
    /// asynchronously).
    async fn wait_sessions(&self, n: u64) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let (_, body) = http_get(self.admin, "/metrics").await;
            let now = body
                .lines()
                .find_map(|l| l.strip_prefix("syncra_relay_sessions "))
                .map(|v| v.trim().parse::<u64>().unwrap());
            if now == Some(n) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "sessions stayed at {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Registers, reads the (empty) backlog, and disconnects: the user exists but is away.
async fn register_away(user: &TestUser, url: &str) {
    let (mut c, _) = user.register(url).await;
    match c.frame().await {
        Frame::PendingEnd { count: 0 } => {}
        other => panic!("expected an empty backlog, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_to_someone_away_is_stored_and_arrives_first_when_they_log_in() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), &[]);
    let url = relay.url();
    let (alice, bob) = (TestUser::new("alice"), TestUser::new("bob"));
    let (mut ca, _) = alice.register(&url).await;
    register_away(&bob, &url).await;
    relay.wait_sessions(1).await;

    for (i, body) in [b"one", b"two", b"thr"].iter().enumerate() {
        assert_eq!(
            send(&mut ca, i as u32 + 1, &alice, &bob, *body).await,
            Outcome::Stored
        );
    }
    let (mut cb, backlog) = login_backlog(&bob, &url).await;
    let bodies: Vec<Vec<u8>> = backlog.iter().map(|(_, e)| bob.open(e)).collect();
    assert_eq!(
        bodies,
        [b"one".to_vec(), b"two".to_vec(), b"thr".to_vec()],
        "in order"
    );
    assert!(backlog.windows(2).all(|w| w[0].0 < w[1].0), "ids increase");

    // Live traffic follows the backlog.
    assert_eq!(
        send(&mut ca, 10, &alice, &bob, b"live").await,
        Outcome::Delivered
    );
    assert_eq!(bob.open(&cb.delivery().await), b"live");

    // Not acknowledged: it comes again at the next login. Acknowledged: gone.
    drop(cb);
    relay.wait_sessions(1).await;
    let (mut cb, again) = login_backlog(&bob, &url).await;
    assert_eq!(again.len(), 3, "unacknowledged entries are sent again");
    cb.send(&Frame::Acknowledge {
        entry_id: again[2].0,
    })
    .await;
    cb.send(&Frame::Ping { nonce: 1 }).await;
    assert!(matches!(cb.reply().await, Frame::Pong { nonce: 1 }));
    drop(cb);
    let (_cb, none) = login_backlog(&bob, &url).await;
    assert!(none.is_empty(), "acknowledged entries are deleted");
}

/// `stored` means on disk: SIGKILL right after the answer loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_message_survives_the_relay_being_killed() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&dir.path().join("relay"), &[]);
    let url = relay.url();
    let (alice, bob) = (TestUser::new("alice"), TestUser::new("bob"));
    let (mut ca, _) = alice.register(&url).await;
    register_away(&bob, &url).await;
    relay.wait_sessions(1).await;
    for i in 0..20u32 {
        assert_eq!(
            send(&mut ca, i + 1, &alice, &bob, format!("m{i}").as_bytes()).await,
            Outcome::Stored
        );
    }
    relay.process.restart(); // SIGKILL, then start again on the same data.
    let (_cb, backlog) = login_backlog(&bob, &url).await;
    let bodies: Vec<String> = backlog
        .iter()
        .map(|(_, e)| String::from_utf8(bob.open(e)).unwrap())
        .collect();
    let want: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_mailbox_refuses_with_mailbox_full_and_a_user_can_empty_theirs() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(
        &dir.path().join("relay"),
        &[("SYNCRA_MAILBOX__MAX_ENTRIES_PER_RECIPIENT", "2")],
    );
    let url = relay.url();
    let (alice, bob) = (TestUser::new("alice"), TestUser::new("bob"));
    let (mut ca, _) = alice.register(&url).await;
    register_away(&bob, &url).await;
    relay.wait_sessions(1).await;
    assert_eq!(send(&mut ca, 1, &alice, &bob, b"a").await, Outcome::Stored);
    assert_eq!(send(&mut ca, 2, &alice, &bob, b"b").await, Outcome::Stored);
    assert_eq!(
        send(&mut ca, 3, &alice, &bob, b"c").await,
        Outcome::Rejected(ErrorCode::MailboxFull)
    );
    let (mut cb, backlog) = login_backlog(&bob, &url).await;
    assert_eq!(backlog.len(), 2);
    cb.send(&Frame::ClearMailbox { request_id: 5 }).await;
    assert_eq!(cb.reply().await, Frame::Ack { request_id: 5 });
    drop(cb);
    relay.wait_sessions(1).await;
    let (_cb, none) = login_backlog(&bob, &url).await;
    assert!(none.is_empty(), "the user emptied the mailbox");
    // Room again.
    assert_eq!(
        send(&mut ca, 4, &alice, &bob, b"d").await,
        Outcome::Delivered
    );
}

/// `[mailbox] kind = "none"`: the blueprint's strict relay, which stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailbox_none_is_the_strict_stateless_relay() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(
        &dir.path().join("relay"),
        &[("SYNCRA_MAILBOX__KIND", "none")],
    );
    let url = relay.url();
    let (alice, bob) = (TestUser::new("alice"), TestUser::new("bob"));
    let (mut ca, _) = alice.register(&url).await;
    drop(bob.register(&url).await);
    relay.wait_sessions(1).await;
    assert_eq!(
        send(&mut ca, 1, &alice, &bob, b"gone").await,
        Outcome::Offline
    );
    let mut cb = RawClient::connect(&url).await;
    cb.send(&bob.auth_frame(&cb)).await;
    expect_auth_ok(&mut cb, bob.id()).await;
    cb.send(&Frame::Ping { nonce: 3 }).await;
    // Nothing was held: the first frame after login is the pong.
    match cb.recv().await {
        Received::Frame(Frame::Pong { nonce: 3 }) => {}
        other => panic!("expected only the pong, got {other:?}"),
    }
    assert!(!dir.path().join("relay").join("mailbox.db").exists());
}

/// Stored through node A, delivered when the recipient logs into node B (a shared mailbox and
/// a real Redis between the nodes); an entry stored while the recipient is already logged in
/// elsewhere is picked up at its next ping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_on_one_node_is_delivered_on_another() {
    let redis = RedisServer::start();
    let shared = tempfile::tempdir().unwrap();
    let node = |name: &str| {
        Relay::start(
            &shared.path().join(name),
            &[
                ("SYNCRA_RELAY_ID", "mailbox-cluster"),
                ("SYNCRA_BROKER__KIND", "redis"),
                ("SYNCRA_BROKER__URL", &redis.url()),
                (
                    "SYNCRA_STORE__PATH",
                    shared.path().join("identities.db").to_str().unwrap(),
                ),
                (
                    "SYNCRA_MAILBOX__PATH",
                    shared.path().join("mailbox.db").to_str().unwrap(),
                ),
                (
                    "SYNCRA_AUTH__TOKEN_KEY_FILE",
                    shared.path().join("token.key").to_str().unwrap(),
                ),
            ],
        )
    };
    let (a, b) = (node("a"), node("b"));
    let (alice, bob) = (TestUser::new("alice"), TestUser::new("bob"));
    let (mut ca, _) = alice.register(&a.url()).await;
    register_away(&bob, &b.url()).await;
    b.wait_sessions(0).await;
    assert_eq!(
        send(&mut ca, 1, &alice, &bob, b"via a").await,
        Outcome::Stored
    );
    let (mut cb, backlog) = login_backlog(&bob, &b.url()).await;
    assert_eq!(backlog.len(), 1);
    assert_eq!(bob.open(&backlog[0].1), b"via a");
    cb.send(&Frame::Acknowledge {
        entry_id: backlog[0].0,
    })
    .await;
    // Bob is on B now: A reaches him through the broker (the subscription settles first).
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut id = 10;
    loop {
        id += 1;
        match send(&mut ca, id, &alice, &bob, b"live via b").await {
            Outcome::Delivered => break,
            // Before B's subscription is visible the message is held, then picked up at Bob's
            // next ping on B: never lost either way.
            Outcome::Stored => {
                cb.send(&Frame::Ping { nonce: 7 }).await;
                loop {
                    match cb.frame().await {
                        Frame::Pending { entry_id, envelope } => {
                            assert_eq!(bob.open(&envelope), b"live via b");
                            cb.send(&Frame::Acknowledge { entry_id }).await;
                        }
                        Frame::Pong { nonce: 7 } => break,
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }
            other => panic!("unexpected outcome {other:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never delivered via B"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(bob.open(&cb.delivery().await), b"live via b");
}

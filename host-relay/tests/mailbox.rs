//! The offline mailbox against real `syncra-relay` processes: a message to someone who is not
//! connected is answered `stored` and arrives first, in order, when they log in (on any node);
//! it leaves the mailbox only when acknowledged; quotas refuse with `mailbox_full`;
//! `[mailbox] kind = "none"` keeps the strict stateless relay.
//!
//! For every backend (`sqlite`, `postgres`, `redis`, `nats`), on real servers this test starts:
//! a `stored` answer survives the relay being killed with SIGKILL right after it and the backend
//! crashing and starting again on its data; and for every backend a cluster can share, a
//! message stored through node A is delivered when the recipient logs into node B.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use std::time::Duration;

use bytes::Bytes;
use syncra_core::wire::{ErrorCode, Frame, Outcome};
use syncra_test_relay::{RawClient, Received, TestUser, expect_auth_ok, http_get};
use syncra_test_support::DEADLINE;
use syncra_test_support::postgres::PostgresServer;
use syncra_test_support::process::{RelayProcess, free_port};
use syncra_test_support::servers::{NatsServer, RedisServer};

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
    // Nothing was held: an empty backlog's end, then the pong.
    match cb.recv().await {
        Received::Frame(Frame::PendingEnd { count: 0 }) => {}
        other => panic!("expected an empty backlog's end, got {other:?}"),
    }
    match cb.recv().await {
        Received::Frame(Frame::Pong { nonce: 3 }) => {}
        other => panic!("expected only the pong, got {other:?}"),
    }
    assert!(!dir.path().join("relay").join("mailbox.db").exists());
}

/// A mailbox backend on a real server started for the test, with the settings that make
/// `stored` durable (an fsynced append-only Redis, a JetStream store directory, Postgres
/// commits the mailbox makes synchronous itself).
enum Backend {
    /// The relay's own file (in the shared directory, so that two nodes on one host can share
    /// it in the cluster test).
    Sqlite(std::path::PathBuf),
    Postgres(PostgresServer),
    Redis(RedisServer),
    Nats(NatsServer),
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Sqlite,
    Postgres,
    Redis,
    Nats,
}

impl Backend {
    fn start(kind: Kind, shared: &std::path::Path) -> Backend {
        match kind {
            Kind::Sqlite => Backend::Sqlite(shared.join("mailbox.db")),
            Kind::Postgres => Backend::Postgres(PostgresServer::start()),
            Kind::Redis => Backend::Redis(RedisServer::start_durable()),
            Kind::Nats => Backend::Nats(NatsServer::start_jetstream()),
        }
    }

    /// The relay's `[mailbox]` settings for this backend.
    fn mailbox_env(&self) -> Vec<(String, String)> {
        let (kind, key, value) = match self {
            Backend::Sqlite(path) => ("sqlite", "PATH", path.display().to_string()),
            Backend::Postgres(s) => ("postgres", "URL", s.url()),
            Backend::Redis(s) => ("redis", "URL", s.url()),
            Backend::Nats(s) => ("nats", "URL", s.url()),
        };
        vec![
            ("SYNCRA_MAILBOX__KIND".into(), kind.into()),
            (format!("SYNCRA_MAILBOX__{key}"), value),
        ]
    }

    /// The backend's process dies without a goodbye and starts again on the same data:
    /// SIGKILL for Redis and NATS, Postgres's immediate shutdown (see
    /// [`PostgresServer::crash`]). SQLite lives in the relay's process: nothing to do.
    fn crash_and_restart(&mut self) {
        match self {
            Backend::Sqlite(_) => {}
            Backend::Postgres(s) => {
                s.crash();
                s.restart();
            }
            Backend::Redis(s) => {
                s.stop();
                s.restart();
            }
            Backend::Nats(s) => {
                s.stop();
                s.restart();
            }
        }
    }
}

fn env_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

impl Relay {
    /// Waits until `/healthz` says every backend is up again.
    async fn wait_healthy(&self) {
        let deadline = tokio::time::Instant::now() + DEADLINE * 3;
        loop {
            // Just after a restart the admin endpoint may not listen yet: the process is only
            // known to listen on its own port.
            let listening = tokio::net::TcpStream::connect(self.admin).await.is_ok();
            let body = if listening {
                let (status, body) = http_get(self.admin, "/healthz").await;
                if status == 200 {
                    return;
                }
                body
            } else {
                "(the admin endpoint does not listen)".to_owned()
            };
            assert!(
                tokio::time::Instant::now() < deadline,
                "the relay never became healthy again: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Logs in and collects `want` mailbox entries: the login's backlog, then what pings pick up
/// (a backend still recovering may answer the first read late; what was not sent then stays in
/// the mailbox for the next check, which is what a client's pings are). Returns the bodies in
/// the order they arrived.
async fn login_and_collect(user: &TestUser, url: &str, want: usize) -> Vec<String> {
    let (mut c, backlog) = login_backlog(user, url).await;
    let mut bodies: Vec<String> = backlog
        .iter()
        .map(|(_, e)| String::from_utf8(user.open(e)).unwrap())
        .collect();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut nonce = 100;
    while bodies.len() < want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {want} entries arrived: {bodies:?}",
            bodies.len()
        );
        nonce += 1;
        c.send(&Frame::Ping { nonce }).await;
        loop {
            match c.frame().await {
                Frame::Pending { envelope, .. } => {
                    bodies.push(String::from_utf8(user.open(&envelope)).unwrap());
                }
                Frame::Pong { nonce: n } if n == nonce => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        if bodies.len() < want {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    bodies
}

/// Sends `bodies` from `from` to `to`, each answered `stored`.
async fn store_all(
    c: &mut RawClient,
    from: &TestUser,
    to: &TestUser,
    first_id: u32,
    bodies: &[String],
) {
    for (i, body) in bodies.iter().enumerate() {
        assert_eq!(
            send(c, first_id + i as u32, from, to, body.as_bytes()).await,
            Outcome::Stored,
            "{body}"
        );
    }
}

fn numbered(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// `stored` is a promise: the relay is killed with SIGKILL right after the last answer and the
/// backend crashes and comes back on its data before the relay starts again; then, with the
/// relay running, more is stored and the backend crashes again. The recipient gets every
/// message, in order.
async fn stored_survives_relay_and_backend_crashes(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let mut backend = Backend::start(kind, dir.path());
    let env = backend.mailbox_env();
    let mut relay = Relay::start(&dir.path().join("relay"), &env_refs(&env));
    let url = relay.url();
    let (alice, bob) = (TestUser::new("alice"), TestUser::new("bob"));
    let (mut ca, _) = alice.register(&url).await;
    register_away(&bob, &url).await;
    relay.wait_sessions(1).await;

    let before = numbered("before-", 10);
    store_all(&mut ca, &alice, &bob, 1, &before).await;
    relay.process.kill();
    backend.crash_and_restart();
    relay.process.restart();
    relay.wait_healthy().await;

    // The relay runs; the backend crashes under it.
    let mut ca = alice.login(&url).await;
    let after = numbered("after-", 5);
    store_all(&mut ca, &alice, &bob, 100, &after).await;
    backend.crash_and_restart();
    relay.wait_healthy().await;

    let got = login_and_collect(&bob, &url, 15).await;
    let want: Vec<String> = before.into_iter().chain(after).collect();
    assert_eq!(got, want, "{kind:?}: every stored message, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_stored_survives_crashes() {
    stored_survives_relay_and_backend_crashes(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stored_survives_crashes() {
    stored_survives_relay_and_backend_crashes(Kind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stored_survives_crashes() {
    stored_survives_relay_and_backend_crashes(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_stored_survives_crashes() {
    stored_survives_relay_and_backend_crashes(Kind::Nats).await;
}

/// Stored through node A, delivered when the recipient logs into node B (the mailbox shared
/// between the nodes; the broker is the backend's own server for Redis and NATS, a Redis for
/// the others; identities in Postgres for Postgres, else in a shared SQLite file); then, with
/// the recipient on B, A reaches them live through the broker, and an entry stored while B's
/// subscription settles is picked up at the recipient's next ping — never lost either way.
async fn stored_on_one_node_is_delivered_on_another(kind: Kind) {
    let shared = tempfile::tempdir().unwrap();
    let backend = Backend::start(kind, shared.path());
    let redis_broker = match &backend {
        Backend::Redis(_) | Backend::Nats(_) => None,
        Backend::Sqlite(_) | Backend::Postgres(_) => Some(RedisServer::start()),
    };
    let mut env = backend.mailbox_env();
    let (broker_kind, broker_url) = match (&backend, &redis_broker) {
        (Backend::Nats(s), _) => ("nats", s.url()),
        (Backend::Redis(s), _) => ("redis", s.url()),
        (_, Some(r)) => ("redis", r.url()),
        (_, None) => unreachable!("a broker was started above"),
    };
    env.extend([
        ("SYNCRA_RELAY_ID".to_owned(), "mailbox-cluster".to_owned()),
        ("SYNCRA_BROKER__KIND".to_owned(), broker_kind.to_owned()),
        ("SYNCRA_BROKER__URL".to_owned(), broker_url),
        (
            "SYNCRA_AUTH__TOKEN_KEY_FILE".to_owned(),
            shared.path().join("token.key").display().to_string(),
        ),
    ]);
    match &backend {
        Backend::Postgres(pg) => env.extend([
            ("SYNCRA_STORE__KIND".to_owned(), "postgres".to_owned()),
            ("SYNCRA_STORE__URL".to_owned(), pg.url()),
        ]),
        _ => env.push((
            "SYNCRA_STORE__PATH".to_owned(),
            shared.path().join("identities.db").display().to_string(),
        )),
    }
    let (a, b) = (
        Relay::start(&shared.path().join("a"), &env_refs(&env)),
        Relay::start(&shared.path().join("b"), &env_refs(&env)),
    );
    let (alice, bob) = (TestUser::new("alice"), TestUser::new("bob"));
    let (mut ca, _) = alice.register(&a.url()).await;
    register_away(&bob, &b.url()).await;
    b.wait_sessions(0).await;
    assert_eq!(
        send(&mut ca, 1, &alice, &bob, b"via a").await,
        Outcome::Stored,
        "{kind:?}"
    );
    let (mut cb, backlog) = login_backlog(&bob, &b.url()).await;
    assert_eq!(backlog.len(), 1, "{kind:?}");
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
            other => panic!("{kind:?}: unexpected outcome {other:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{kind:?}: never delivered via B"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(bob.open(&cb.delivery().await), b"live via b");
    // The acknowledgements went to the shared mailbox (answers leave in request order, so
    // once the pong is here they were done): nothing is left for a login on A.
    cb.send(&Frame::Ping { nonce: 8 }).await;
    loop {
        match cb.frame().await {
            Frame::Pong { nonce: 8 } => break,
            Frame::Pending { entry_id, .. } => cb.send(&Frame::Acknowledge { entry_id }).await,
            other => panic!("unexpected {other:?}"),
        }
    }
    drop(cb);
    b.wait_sessions(0).await;
    let (_cb, left) = login_backlog(&bob, &a.url()).await;
    assert!(left.is_empty(), "{kind:?}: acknowledged on B, gone on A");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_shared_file_across_nodes() {
    stored_on_one_node_is_delivered_on_another(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_across_nodes() {
    stored_on_one_node_is_delivered_on_another(Kind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_across_nodes() {
    stored_on_one_node_is_delivered_on_another(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_across_nodes() {
    stored_on_one_node_is_delivered_on_another(Kind::Nats).await;
}

/// Per-user and per-address message budgets a test's bursts do not reach.
const NO_SEND_LIMITS: [(&str, &str); 4] = [
    ("SYNCRA_LIMITS__MESSAGES_PER_SECOND_PER_USER", "100000"),
    ("SYNCRA_LIMITS__MESSAGE_BURST_PER_USER", "100000"),
    ("SYNCRA_LIMITS__MESSAGES_PER_SECOND_PER_ADDRESS", "100000"),
    ("SYNCRA_LIMITS__MESSAGE_BURST_PER_ADDRESS", "100000"),
];

/// A draining client acknowledges every entry as it files it; the relay coalesces the burst
/// (one mailbox call at a time per session, up to the highest id so far). Nothing beyond the
/// highest acknowledged id is deleted, everything up to it is, and a pong after the burst means
/// it was processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_acknowledgements_deletes_exactly_up_to_the_highest() {
    let dir = tempfile::tempdir().unwrap();
    // 300 sends and 200 acknowledgements in a moment: above the default per-user and
    // per-address budgets, which are not what this test is about.
    let relay = Relay::start(&dir.path().join("relay"), &NO_SEND_LIMITS);
    let url = relay.url();
    let (alice, bob) = (TestUser::new("alice"), TestUser::new("bob"));
    let (mut ca, _) = alice.register(&url).await;
    register_away(&bob, &url).await;
    relay.wait_sessions(1).await;
    let bodies = numbered("m", 300);
    store_all(&mut ca, &alice, &bob, 1, &bodies).await;

    let (mut cb, backlog) = login_backlog(&bob, &url).await;
    assert_eq!(backlog.len(), 300);
    for (entry_id, _) in &backlog[..200] {
        cb.send(&Frame::Acknowledge {
            entry_id: *entry_id,
        })
        .await;
    }
    cb.send(&Frame::Ping { nonce: 9 }).await;
    assert!(matches!(cb.reply().await, Frame::Pong { nonce: 9 }));
    drop(cb);
    relay.wait_sessions(1).await;
    let got = login_and_collect(&bob, &url, 100).await;
    assert_eq!(got, bodies[200..], "exactly the unacknowledged 100 remain");
}

/// Entries of the large backlog below, and the size of each body: 2 000 × 16 KB is about
/// 32 MB, far more than the sockets between the relay and the test buffer (a few MB on
/// loopback), so the relay is still writing the backlog when the requests arrive — it cannot
/// write more before the client reads.
const BIG_BACKLOG: usize = 2000;
const BIG_BODY: usize = 16 * 1024;

/// A big body numbered `i`: its number, then filler up to [`BIG_BODY`].
fn big_body(i: usize) -> Vec<u8> {
    let mut body = format!("{i:05}:").into_bytes();
    body.resize(BIG_BODY, b'x');
    body
}

/// Stores `n` big bodies from `from` for `to`, pipelined 32 at a time (the requests a relay
/// serves at once), each answered `stored`.
async fn store_big(c: &mut RawClient, from: &TestUser, to: &TestUser, n: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(32) {
        for &i in chunk {
            c.send(&Frame::Send {
                request_id: i as u32 + 1,
                envelope: from.seal(&[to], &big_body(i)).into(),
            })
            .await;
        }
        for &i in chunk {
            match c.reply().await {
                Frame::SendResult {
                    request_id,
                    outcomes,
                    ..
                } => {
                    assert_eq!(request_id, i as u32 + 1);
                    assert_eq!(outcomes[0].outcome, Outcome::Stored, "entry {i}");
                }
                other => panic!("expected a send result, got {other:?}"),
            }
        }
    }
}

/// A large backlog does not hold up the answers to what the client asks meanwhile: replies may
/// overtake the backlog's `Pending` frames, while the backlog itself still arrives whole and in
/// order and live deliveries still come only after `PendingEnd`. Before, the relay wrote the
/// whole backlog before any reply, so a reconnecting client's lookups and sends timed out
/// behind a big mailbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_overtake_a_large_backlog_and_live_deliveries_still_follow_it() {
    let dir = tempfile::tempdir().unwrap();
    // 2 000 large sends in a moment: above the default per-user, per-address and fan-out
    // budgets, which are not what this test is about.
    let relay = Relay::start(
        &dir.path().join("relay"),
        &[
            NO_SEND_LIMITS.as_slice(),
            &[
                ("SYNCRA_LIMITS__FANOUT_BURST_BYTES_PER_USER", "1073741824"),
                (
                    "SYNCRA_LIMITS__FANOUT_BYTES_PER_SECOND_PER_USER",
                    "1073741824",
                ),
            ],
        ]
        .concat(),
    );
    let url = relay.url();
    let (alice, bob) = (TestUser::new("alice"), TestUser::new("bob"));
    let (mut ca, _) = alice.register(&url).await;
    register_away(&bob, &url).await;
    relay.wait_sessions(1).await;
    store_big(&mut ca, &alice, &bob, BIG_BACKLOG).await;

    // Bob logs in and, reading nothing after `AuthOk`, asks two things; Alice then reaches him
    // live while his backlog is still being written.
    let mut cb = RawClient::connect(&url).await;
    cb.send(&bob.auth_frame(&cb)).await;
    expect_auth_ok(&mut cb, bob.id()).await;
    cb.send(&Frame::LookupHandle {
        request_id: 1,
        handle: alice.handle.clone(),
    })
    .await;
    cb.send(&Frame::Ping { nonce: 2 }).await;
    assert_eq!(
        send(&mut ca, 90_000, &alice, &bob, b"live").await,
        Outcome::Delivered,
        "his session took it"
    );

    let mut entries: Vec<(u64, Bytes)> = Vec::new();
    let (mut record, mut pong, mut end) = (None, None, None);
    loop {
        match cb.frame().await {
            Frame::Pending { entry_id, envelope } => {
                assert!(end.is_none(), "a Pending after PendingEnd");
                entries.push((entry_id, envelope));
            }
            Frame::Record {
                request_id: 1,
                record: r,
            } => {
                assert_eq!(r.handle.as_str(), alice.handle);
                record = Some(entries.len());
            }
            Frame::Pong { nonce: 2 } => {
                assert!(record.is_some(), "replies leave in request order");
                pong = Some(entries.len());
            }
            Frame::PendingEnd { count } => {
                assert!(
                    record.is_some() && pong.is_some(),
                    "the answers overtake the backlog: lookup after entry {record:?}, pong \
                     after entry {pong:?}, PendingEnd after entry {}",
                    entries.len()
                );
                assert_eq!(
                    count as usize,
                    entries.len(),
                    "PendingEnd counts the backlog"
                );
                end = Some(count);
            }
            Frame::Deliver { envelope } => {
                assert!(end.is_some(), "a live delivery before PendingEnd");
                assert_eq!(bob.open(&envelope), b"live");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(entries.len(), BIG_BACKLOG, "the whole backlog");
    assert!(
        entries.windows(2).all(|w| w[0].0 < w[1].0),
        "entry ids strictly increase"
    );
    for (i, (_, envelope)) in entries.iter().enumerate() {
        assert_eq!(
            bob.open(envelope),
            big_body(i),
            "entry {i} in the order stored"
        );
    }
}

/// Someone who can write to the mailbox's backend but is not a relay of the cluster (an
/// ordinary client of the same Redis or NATS server, without the cluster key) appends entries
/// to a recipient's mailbox: a genuine-looking envelope from a registered user (which the
/// recipient's client would accept if it were handed out), entries written with the backend's
/// own format, and on NATS a bare publish on the recipient's subject, without the plugin's
/// headers. None reaches the recipient; each is counted; a relay's put after them is still
/// `stored` (before, on NATS, an entry without headers made every later put and take of that
/// recipient fail) and the recipient's backlog is exactly what senders stored through the relay.
async fn foreign_entries_never_reach_a_session(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(kind, dir.path());
    let url_of_backend = match &backend {
        Backend::Redis(s) => s.url(),
        Backend::Nats(s) => s.url(),
        _ => unreachable!("shared backends only"),
    };
    let env = backend.mailbox_env();
    let relay = Relay::start(&dir.path().join("relay"), &env_refs(&env));
    let url = relay.url();
    let (alice, bob, eve) = (
        TestUser::new("alice"),
        TestUser::new("bob"),
        TestUser::new("eve"),
    );
    let (mut ca, _) = alice.register(&url).await;
    register_away(&bob, &url).await;
    register_away(&eve, &url).await;
    relay.wait_sessions(1).await;
    assert_eq!(
        send(&mut ca, 1, &alice, &bob, b"before").await,
        Outcome::Stored
    );

    // The outsider writes with the backend's own plugin, as any client of that server can.
    let registry = syncra_relay::plugin_registry().unwrap();
    let outsider = registry
        .mailboxes
        .create(
            serde_json::json!({ "kind": env[0].1, "url": url_of_backend }),
            syncra_core::mailbox::MailboxLimits::default(),
        )
        .await
        .unwrap();
    let now = syncra_core::now_ms();
    let forged = [
        eve.seal(&[&bob], b"from the backend"),
        b"not an envelope".to_vec(),
        Vec::new(),
    ];
    for body in &forged {
        outsider
            .put(&bob.id(), Bytes::from(body.clone()), now)
            .await
            .unwrap();
    }
    let foreign = forged.len() as u64;
    if matches!(kind, Kind::Nats) {
        // A bare publish: JetStream stores it in the stream, without the plugin's headers.
        let broker = registry
            .brokers
            .create(
                serde_json::json!({ "kind": "nats", "url": url_of_backend }),
                std::sync::Arc::new(Deaf) as std::sync::Arc<dyn syncra_core::broker::BrokerSink>,
            )
            .await
            .unwrap();
        broker
            .publish_confirm(
                &syncra_broker_nats::mailbox::subject(&bob.id()),
                Bytes::from(eve.seal(&[&bob], b"bare publish")),
                syncra_core::Confirm::Nothing,
            )
            .await
            .unwrap();
        // No entry of the plugin's format: the relay's next put for Bob removes it, so the
        // relay never reads it as an entry (and does not count it).
    }
    assert_eq!(
        send(&mut ca, 2, &alice, &bob, b"after").await,
        Outcome::Stored
    );

    let (_cb, backlog) = login_backlog(&bob, &url).await;
    let bodies: Vec<Vec<u8>> = backlog.iter().map(|(_, e)| bob.open(e)).collect();
    assert_eq!(
        bodies,
        [b"before".to_vec(), b"after".to_vec()],
        "{kind:?}: only what went through the relay"
    );
    let (_, metrics) = http_get(relay.admin, "/metrics").await;
    let counted = metrics
        .lines()
        .find_map(|l| l.strip_prefix("syncra_relay_mailbox_foreign_total "))
        .map(|v| v.trim().parse::<u64>().unwrap());
    assert_eq!(
        counted,
        Some(foreign),
        "{kind:?}: every foreign entry counted"
    );
}

/// A broker sink that takes nothing (the outsider only publishes).
struct Deaf;

impl syncra_core::broker::BrokerSink for Deaf {
    fn deliver(&self, _topic: &str, _payload: Bytes) -> bool {
        false
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_foreign_entries_never_reach_a_session() {
    foreign_entries_never_reach_a_session(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_foreign_entries_never_reach_a_session() {
    foreign_entries_never_reach_a_session(Kind::Nats).await;
}

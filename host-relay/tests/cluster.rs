//! Several relay nodes on one broker (Redis and NATS, the same tests for both) and one store:
//! cross-node delivery, a user on two nodes, truthful outcomes, resume on another node, and a
//! broker outage that never produces a false "delivered" and recovers by itself.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use syncra_core::wire::{ErrorCode, Frame, Outcome};
use syncra_test_relay::{RawClient, TestRelay, TestUser, expect_auth_ok};
use syncra_test_support::DEADLINE;
use syncra_test_support::latency::DelayedLink;
use syncra_test_support::servers::{NatsCluster, NatsServer, RedisServer};

#[derive(Clone, Copy, Debug)]
enum Kind {
    Redis,
    Nats,
}

enum Server {
    Redis(RedisServer),
    Nats(NatsServer),
}

impl Server {
    fn start(kind: Kind) -> Server {
        match kind {
            Kind::Redis => Server::Redis(RedisServer::start()),
            Kind::Nats => Server::Nats(NatsServer::start()),
        }
    }
    fn url(&self) -> String {
        match self {
            Server::Redis(s) => s.url(),
            Server::Nats(s) => s.url(),
        }
    }
    fn kind(&self) -> &'static str {
        match self {
            Server::Redis(_) => "redis",
            Server::Nats(_) => "nats",
        }
    }
    fn stop(&mut self) {
        match self {
            Server::Redis(s) => s.stop(),
            Server::Nats(s) => s.stop(),
        }
    }
    fn restart(&mut self) {
        match self {
            Server::Redis(s) => s.restart(),
            Server::Nats(s) => s.restart(),
        }
    }
}

struct Cluster {
    server: Server,
    nodes: Vec<TestRelay>,
    _shared: tempfile::TempDir,
}

async fn cluster(kind: Kind, n: usize) -> Cluster {
    let server = Server::start(kind);
    let shared = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for _ in 0..n {
        nodes.push(node(&server, shared.path()).await);
    }
    Cluster {
        server,
        nodes,
        _shared: shared,
    }
}

/// One node: the cluster's broker, a shared SQLite store and a shared token key.
async fn node(server: &Server, shared: &Path) -> TestRelay {
    node_on(server.kind(), server.url(), shared).await
}

/// One node on a broker of `kind` at `url`, with the shared store, mailbox and token key.
async fn node_on(kind: &'static str, url: String, shared: &Path) -> TestRelay {
    let store = shared.join("identities.db");
    let mailbox = shared.join("mailbox.db");
    let key = shared.join("token.key");
    TestRelay::start(move |c| {
        c.broker = serde_json::json!({ "kind": kind, "url": url });
        c.store = serde_json::json!({ "kind": "sqlite", "path": store });
        c.mailbox = serde_json::json!({ "kind": "sqlite", "path": mailbox });
        c.auth.token_key_file = key;
        c.relay_id = "test-cluster".into();
    })
    .await
}

/// Sends until the outcome is as expected (subscriptions settle asynchronously after login).
async fn send_until(
    c: &mut RawClient,
    from: &TestUser,
    to: &[&TestUser],
    body: &[u8],
    want: &[Outcome],
) -> Vec<Outcome> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut id = 0;
    loop {
        id += 1;
        let got: Vec<Outcome> = c
            .send_envelope(id, from.seal(to, body))
            .await
            .into_iter()
            .map(|o| o.outcome)
            .collect();
        if got == want || tokio::time::Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn two_nodes_exchange_and_report_truthfully(kind: Kind) {
    let cl = cluster(kind, 2).await;
    let (a, b, offline) = (
        TestUser::new("xa"),
        TestUser::new("xb"),
        TestUser::new("xoff"),
    );
    let (mut ca, token_a) = a.register(cl.nodes[0].url()).await;
    let (mut cb, _) = b.register(cl.nodes[1].url()).await;
    let (gone, _) = offline.register(cl.nodes[1].url()).await;
    drop(gone);

    // A on node 0 writes to B on node 1, and back.
    let got = send_until(&mut ca, &a, &[&b], b"across nodes", &[Outcome::Delivered]).await;
    assert_eq!(got, [Outcome::Delivered], "{kind:?}");
    assert_eq!(b.open(&cb.delivery().await), b"across nodes");
    let out = cb.send_envelope(1, b.seal(&[&a], b"and back")).await;
    assert_eq!(out[0].outcome, Outcome::Delivered);
    // Drain until the reply (earlier retries of send_until may have delivered copies).
    loop {
        if a.open(&ca.delivery().await) == b"and back" {
            break;
        }
    }

    // Nobody holds `offline` anywhere: held in the shared mailbox, not a false "delivered".
    let got = send_until(&mut ca, &a, &[&offline], b"anyone?", &[Outcome::Stored]).await;
    assert_eq!(got, [Outcome::Stored], "{kind:?}");

    // A's token from node 0 resumes on node 1.
    let mut resumed = RawClient::connect(cl.nodes[1].url()).await;
    resumed.send(&Frame::Resume { token: token_a }).await;
    expect_auth_ok(&mut resumed, a.id()).await;
}

/// How far node 0 of [`a_user_on_two_nodes_receives_on_both`] is from the broker: what the
/// broker sends it arrives this much later. Far beyond the time a client takes to hear its
/// `AuthOk` and send, and beyond NATS's reply window (20 ms by default).
const FAR: Duration = Duration::from_millis(300);

/// B logs in on nodes 1 and 2 while A's node 0 hears the broker [`FAR`] later than the others.
/// Each login completes only once every other node applied its presence announcement, so the
/// first message A sends after both logins reaches both of B's sessions: no retry, no wait.
/// (Without that, node 0 learns of B's sessions up to `FAR` after they logged in, and its
/// first message is `stored` or reaches only one of them.)
async fn a_user_on_two_nodes_receives_on_both(kind: Kind) {
    let server = Server::start(kind);
    let port: u16 = server
        .url()
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap();
    let far = DelayedLink::start(port, FAR);
    let far_url = server
        .url()
        .replace(&port.to_string(), &far.port().to_string());
    let shared = tempfile::tempdir().unwrap();
    let n0 = node_on(server.kind(), far_url, shared.path()).await;
    let n1 = node(&server, shared.path()).await;
    let n2 = node(&server, shared.path()).await;
    // Each node has heard of the two others (a login waits for the nodes its node knows of).
    for node in [&n0, &n1, &n2] {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !node.admin_get("/healthz").await.1.contains("\"nodes\":2") {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{kind:?}: the nodes never heard of each other"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let (a, b) = (TestUser::new("ya"), TestUser::new("yb"));
    let (mut ca, _) = a.register(n0.url()).await;
    let (mut b1, _) = b.register(n1.url()).await;
    let mut b2 = b.login(n2.url()).await;
    let out = ca.send_envelope(1, a.seal(&[&b], b"both of you")).await;
    assert_eq!(out[0].outcome, Outcome::Delivered, "{kind:?}");
    for (which, session) in [("first", &mut b1), ("second", &mut b2)] {
        let got = tokio::time::timeout(DEADLINE, session.delivery())
            .await
            .unwrap_or_else(|_| panic!("{kind:?}: B's {which} session never got it"));
        assert_eq!(b.open(&got), b"both of you");
    }
}

async fn a_group_across_three_nodes(kind: Kind) {
    let cl = cluster(kind, 3).await;
    let users: Vec<TestUser> = (0..3).map(|i| TestUser::new(&format!("g{i}"))).collect();
    let mut clients = Vec::new();
    for (i, u) in users.iter().enumerate() {
        clients.push(u.register(cl.nodes[i].url()).await.0);
    }
    let to: Vec<&TestUser> = users[1..].iter().collect();
    let got = send_until(
        &mut clients[0],
        &users[0],
        &to,
        b"to the group",
        &[Outcome::Delivered, Outcome::Delivered],
    )
    .await;
    assert_eq!(got, [Outcome::Delivered, Outcome::Delivered]);
    for i in 1..3 {
        assert_eq!(users[i].open(&clients[i].delivery().await), b"to the group");
    }
}

/// The bodies of a client's deliveries that start with `prefix`, until `n` have arrived.
async fn bodies(c: &mut RawClient, user: &TestUser, prefix: &[u8], n: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    while got.len() < n {
        let body = user.open(&c.delivery().await);
        if body.starts_with(prefix) {
            got.push(body);
        }
    }
    got
}

/// A sender that does not wait for answers: many sends in flight at once, some waiting for the
/// broker. Answers come back in request order, every copy arrives in send order on every node.
async fn pipelined_sends_keep_their_order_across_nodes(kind: Kind) {
    let cl = cluster(kind, 2).await;
    let (a, b, c) = (
        TestUser::new("pa"),
        TestUser::new("pb"),
        TestUser::new("pc"),
    );
    // B is on both nodes (one session local to A, one remote); C only on the other node.
    let (mut ca, _) = a.register(cl.nodes[0].url()).await;
    let (mut b_local, _) = b.register(cl.nodes[0].url()).await;
    let mut b_remote = b.login(cl.nodes[1].url()).await;
    let (mut cc, _) = c.register(cl.nodes[1].url()).await;
    let settled = send_until(&mut ca, &a, &[&c], b"settle", &[Outcome::Delivered]).await;
    assert_eq!(settled, [Outcome::Delivered], "{kind:?}");
    // B's remote subscription settles the same way, through a message to B alone: the local
    // session makes it "delivered" at once, so wait for the remote copy instead.
    ca.send_envelope(9_000, a.seal(&[&b], b"settle-b")).await;
    bodies(&mut b_remote, &b, b"settle-b", 1).await;

    const N: u32 = 100;
    for i in 0..N {
        let body = format!("seq-{i:03}");
        ca.send(&Frame::Send {
            request_id: 10_000 + i,
            envelope: a.seal(&[&b, &c], body.as_bytes()).into(),
        })
        .await;
    }
    for i in 0..N {
        match ca.reply().await {
            Frame::SendResult {
                request_id,
                outcomes,
                ..
            } => {
                assert_eq!(request_id, 10_000 + i, "{kind:?}: answers in request order");
                let outcomes: Vec<Outcome> = outcomes.iter().map(|o| o.outcome).collect();
                assert_eq!(
                    outcomes,
                    [Outcome::Delivered, Outcome::Delivered],
                    "{kind:?}: send {i}"
                );
            }
            other => panic!("{kind:?}: expected a send result, got {other:?}"),
        }
    }
    let expected: Vec<Vec<u8>> = (0..N).map(|i| format!("seq-{i:03}").into_bytes()).collect();
    for (who, client, user) in [
        ("B on A's node", &mut b_local, &b),
        ("B on the other node", &mut b_remote, &b),
        ("C on the other node", &mut cc, &c),
    ] {
        let got = bodies(client, user, b"seq-", N as usize).await;
        assert!(
            got == expected,
            "{kind:?}: {who} got the messages out of order"
        );
    }
}

async fn a_broker_outage_is_reported_and_recovers(kind: Kind) {
    let mut cl = cluster(kind, 2).await;
    let (a, b, local) = (
        TestUser::new("oa"),
        TestUser::new("ob"),
        TestUser::new("ol"),
    );
    let (mut ca, _) = a.register(cl.nodes[0].url()).await;
    let (mut cb, _) = b.register(cl.nodes[1].url()).await;
    let (mut cl_local, _) = local.register(cl.nodes[0].url()).await;
    assert_eq!(
        send_until(&mut ca, &a, &[&b], b"before", &[Outcome::Delivered]).await,
        [Outcome::Delivered]
    );
    assert_eq!(b.open(&cb.delivery().await), b"before");

    cl.server.stop();
    // During the outage: every send gets an answer; cross-node sends are never "delivered";
    // local deliveries on the same node keep working; no relay dies.
    let mut saw_unavailable = false;
    for i in 0..10 {
        let out = tokio::time::timeout(
            DEADLINE,
            ca.send_envelope(100 + i, a.seal(&[&b], b"during")),
        )
        .await
        .expect("every send during the outage gets a result");
        match out[0].outcome {
            Outcome::Rejected(ErrorCode::BrokerUnavailable) => saw_unavailable = true,
            Outcome::Delivered => panic!("{kind:?}: claimed delivery while the broker was down"),
            Outcome::Offline | Outcome::Stored | Outcome::Rejected(_) => {}
        }
        if saw_unavailable {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        saw_unavailable,
        "{kind:?}: never answered broker_unavailable"
    );
    let out = ca.send_envelope(200, a.seal(&[&local], b"same node")).await;
    assert_eq!(out[0].outcome, Outcome::Delivered);
    assert_eq!(local.open(&cl_local.delivery().await), b"same node");
    let (status, body) = cl.nodes[0].admin_get("/healthz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"broker\":{\"status\":\"down\""), "{body}");
    // B got nothing during the outage.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), cb.delivery())
            .await
            .is_err()
    );

    // The broker returns: nodes resubscribe by themselves and traffic resumes.
    cl.server.restart();
    let got = send_until(&mut ca, &a, &[&b], b"after", &[Outcome::Delivered]).await;
    assert_eq!(
        got,
        [Outcome::Delivered],
        "{kind:?}: traffic did not resume"
    );
    loop {
        if b.open(&cb.delivery().await) == b"after" {
            break;
        }
    }
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (status, _) = cl.nodes[1].admin_get("/healthz").await;
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "health never recovered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a recipient got, by body: live deliveries and mailbox entries (acknowledged).
#[derive(Default)]
struct Inbox {
    bodies: Vec<Vec<u8>>,
}

impl Inbox {
    /// Reads `c` until every body in `want` arrived or, with nothing left to wait for, a ping
    /// comes back; pings every round so that entries stored after the login's backlog come.
    async fn fill(&mut self, c: &mut RawClient, user: &TestUser, want: &[Vec<u8>]) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let mut nonce = 0;
        while !want.iter().all(|w| self.bodies.contains(w)) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {} messages arrived",
                want.iter().filter(|w| self.bodies.contains(w)).count(),
                want.len()
            );
            nonce += 1;
            c.send(&Frame::Ping { nonce }).await;
            loop {
                match c.frame().await {
                    Frame::Deliver { envelope } => self.bodies.push(user.open(&envelope)),
                    Frame::Pending { entry_id, envelope } => {
                        self.bodies.push(user.open(&envelope));
                        c.send(&Frame::Acknowledge { entry_id }).await;
                    }
                    Frame::PendingEnd { .. } => {}
                    Frame::Pong { nonce: n } if n == nonce => break,
                    other => panic!("unexpected {other:?}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Panics if a body arrived twice.
    fn check_once(&self, kind: Kind) {
        let mut seen = std::collections::HashSet::new();
        for b in &self.bodies {
            assert!(
                seen.insert(b),
                "{kind:?}: {:?} arrived twice",
                String::from_utf8_lossy(b)
            );
        }
    }
}

/// Sends `n` messages `{prefix}-{i}` from `from` to `to` without waiting between them, then
/// reads every answer; returns each message's outcome.
async fn stream(
    mut c: RawClient,
    from: Arc<TestUser>,
    to: Arc<TestUser>,
    prefix: &'static str,
    n: u32,
) -> (RawClient, Vec<(Vec<u8>, Outcome)>) {
    let mut bodies = Vec::new();
    for i in 0..n {
        let body = format!("{prefix}-{i:03}").into_bytes();
        c.send(&Frame::Send {
            request_id: 50_000 + i,
            envelope: from.seal(&[&to], &body).into(),
        })
        .await;
        bodies.push(body);
        // Now and then let the answers catch up, so the stream spans the other side's moves.
        if i % 8 == 7 {
            tokio::task::yield_now().await;
        }
    }
    let mut outcomes = Vec::new();
    for (i, body) in bodies.into_iter().enumerate() {
        match c.reply().await {
            Frame::SendResult {
                request_id,
                outcomes: o,
                ..
            } => {
                assert_eq!(request_id, 50_000 + i as u32);
                outcomes.push((body, o[0].outcome));
            }
            other => panic!("expected a send result, got {other:?}"),
        }
    }
    (c, outcomes)
}

/// Waits until a message from `c`'s node to `nobody` (whose registration session has ended)
/// is `stored`: the mailbox path works from that node.
async fn settled(c: &mut RawClient, from: &TestUser, nobody: &TestUser) {
    let got = send_until(c, from, &[nobody], b"anyone?", &[Outcome::Stored]).await;
    assert_eq!(got, [Outcome::Stored]);
}

/// The outcomes a stream may get while its recipient logs in or moves: `delivered` (a
/// session took it, here or on the node that answered) or `stored` (nobody held the recipient
/// as far as the sender's node knew, and the mailbox has it). Never `offline`,
/// `broker_unavailable` or a rejection with the broker up.
fn check_outcomes(kind: Kind, outcomes: &[(Vec<u8>, Outcome)]) {
    for (body, outcome) in outcomes {
        assert!(
            matches!(outcome, Outcome::Delivered | Outcome::Stored),
            "{kind:?}: {:?} got {outcome:?}",
            String::from_utf8_lossy(body)
        );
    }
}

/// A recipient logs in on another node while a sender streams to them. Sends before the
/// sender's node learnt of the login are stored, later ones delivered; every one arrives
/// exactly once (the stored ones from the mailbox), and none is claimed delivered that did not.
async fn a_login_racing_a_stream_loses_nothing(kind: Kind) {
    let cl = cluster(kind, 2).await;
    let (a, b, nobody) = (
        Arc::new(TestUser::new("ra")),
        Arc::new(TestUser::new("rb")),
        TestUser::new("rn"),
    );
    let (mut ca, _) = a.register(cl.nodes[0].url()).await;
    drop(b.register(cl.nodes[1].url()).await);
    drop(nobody.register(cl.nodes[1].url()).await);
    settled(&mut ca, &a, &nobody).await;

    const N: u32 = 200;
    let sender = tokio::spawn(stream(ca, a.clone(), b.clone(), "race", N));
    let mut cb = b.login(cl.nodes[1].url()).await;
    let (_ca, outcomes) = sender.await.unwrap();
    check_outcomes(kind, &outcomes);
    let all: Vec<Vec<u8>> = outcomes.iter().map(|(b, _)| b.clone()).collect();
    let mut inbox = Inbox::default();
    inbox.fill(&mut cb, &b, &all).await;
    inbox.check_once(kind);
}

/// A recipient leaves one node and logs in on another while a sender on a third streams to
/// them: the sender's node may still believe the old node holds them. The old node answers
/// that nobody took it (on both brokers: the answer is the destination's, not the broker's
/// count), so every message is `delivered` to the new session or `stored`, and every one
/// arrives exactly once.
async fn a_recipient_moving_nodes_mid_stream(kind: Kind) {
    let cl = cluster(kind, 3).await;
    let (a, b, nobody) = (
        Arc::new(TestUser::new("ma")),
        Arc::new(TestUser::new("mb")),
        TestUser::new("mn"),
    );
    let (mut ca, _) = a.register(cl.nodes[0].url()).await;
    let (mut old, _) = b.register(cl.nodes[1].url()).await;
    drop(nobody.register(cl.nodes[1].url()).await);
    settled(&mut ca, &a, &nobody).await;
    // Node 0 knows B is on node 1.
    let got = send_until(&mut ca, &a, &[&b], b"before", &[Outcome::Delivered]).await;
    assert_eq!(got, [Outcome::Delivered]);
    let mut inbox = Inbox::default();
    inbox.fill(&mut old, &b, &[b"before".to_vec()]).await;

    // B leaves node 1; its session there has ended (a session that took a message would
    // rightly count it delivered, and this client would never read it).
    let _ = old
        .conn
        .sink
        .close(syncra_core::transport::CloseReason::normal("moving"))
        .await;
    drop(old);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cl.nodes[1]
        .admin_get("/healthz")
        .await
        .1
        .contains("\"sessions\":0")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "B's session never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    const N: u32 = 200;
    let sender = tokio::spawn(stream(ca, a.clone(), b.clone(), "move", N));
    let mut new = b.login(cl.nodes[2].url()).await;
    let (mut ca, outcomes) = sender.await.unwrap();
    check_outcomes(kind, &outcomes);
    let all: Vec<Vec<u8>> = outcomes.iter().map(|(b, _)| b.clone()).collect();
    let mut inbox = Inbox::default();
    inbox.fill(&mut new, &b, &all).await;
    inbox.check_once(kind);
    // Node 0 has caught up: B is reached on node 2.
    let got = send_until(&mut ca, &a, &[&b], b"after", &[Outcome::Delivered]).await;
    assert_eq!(got, [Outcome::Delivered]);
    inbox.fill(&mut new, &b, &[b"after".to_vec()]).await;
}

/// Two relays on a three-server NATS cluster (full-mesh routes, JetStream on), and the server
/// one relay is connected to is killed while a sender on that relay writes, one message at a
/// time, to a recipient on the other relay. Both relays stay up and reconnect to the servers
/// that are left (relay 0 was given only the killed server's address: it learnt the others from
/// it, as NATS clients do); no message is claimed delivered that does not arrive (each is
/// `delivered`, `stored` or `broker_unavailable`, and every `delivered` and `stored` one
/// arrives, once); both nodes report healthy again and messages are delivered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_ride_out_losing_one_of_three_nats_servers() {
    let mut nats = NatsCluster::start(3);
    let urls = nats.urls();
    let shared = tempfile::tempdir().unwrap();
    let n0 = node_on("nats", urls[0].clone(), shared.path()).await;
    let n1 = node_on("nats", urls.join(","), shared.path()).await;
    let (a, b) = (TestUser::new("ka"), TestUser::new("kb"));
    let (mut ca, _) = a.register(n0.url()).await;
    let (mut cb, _) = b.register(n1.url()).await;
    // The routes form, and node 0 learns where B is.
    let got = send_until(&mut ca, &a, &[&b], b"before", &[Outcome::Delivered]).await;
    assert_eq!(got, [Outcome::Delivered]);

    let mut sent = vec![(b"before".to_vec(), Outcome::Delivered)];
    let mut id = 1_000;
    let mut send = async |ca: &mut RawClient, body: Vec<u8>| {
        id += 1;
        let out = tokio::time::timeout(DEADLINE, ca.send_envelope(id, a.seal(&[&b], &body)))
            .await
            .expect("every send gets an answer, server or no server");
        sent.push((body, out[0].outcome));
        out[0].outcome
    };
    for i in 0..20 {
        send(&mut ca, format!("k-{i:03}").into_bytes()).await;
    }
    nats.servers[0].stop();
    // Until 20 in a row are delivered again (the relays reconnected and resynchronised).
    let deadline = tokio::time::Instant::now() + 3 * DEADLINE;
    let mut in_a_row = 0;
    let mut i = 20;
    while in_a_row < 20 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "traffic did not resume after losing one NATS server"
        );
        let outcome = send(&mut ca, format!("k-{i:03}").into_bytes()).await;
        i += 1;
        in_a_row = if outcome == Outcome::Delivered {
            in_a_row + 1
        } else {
            0
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (body, outcome) in &sent {
        assert!(
            matches!(
                outcome,
                Outcome::Delivered
                    | Outcome::Stored
                    | Outcome::Rejected(ErrorCode::BrokerUnavailable)
            ),
            "{:?} got {outcome:?}",
            String::from_utf8_lossy(body)
        );
    }
    let must_arrive: Vec<Vec<u8>> = sent
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Delivered | Outcome::Stored))
        .map(|(b, _)| b.clone())
        .collect();
    let mut inbox = Inbox::default();
    inbox.fill(&mut cb, &b, &must_arrive).await;
    inbox.check_once(Kind::Nats);
    for node in [&n0, &n1] {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while node.admin_get("/healthz").await.0 != 200 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a node stayed unhealthy"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One node on the NATS servers at `urls`, with the JetStream mailbox kept by three servers,
/// the shared SQLite store and the shared token key.
async fn jetstream_node(urls: String, shared: &Path) -> TestRelay {
    let store = shared.join("identities.db");
    let key = shared.join("token.key");
    TestRelay::start(move |c| {
        c.broker = serde_json::json!({ "kind": "nats", "url": urls });
        c.store = serde_json::json!({ "kind": "sqlite", "path": store });
        c.mailbox = serde_json::json!({ "kind": "nats", "url": urls, "replicas": 3 });
        c.auth.token_key_file = key;
        c.relay_id = "test-cluster".into();
    })
    .await
}

/// Ends a client's session and waits until `node` holds no session any more, so that what is
/// sent next to its user is stored, not taken by a session nobody reads.
async fn leave(c: RawClient, node: &TestRelay) {
    let mut c = c;
    let _ = c
        .conn
        .sink
        .close(syncra_core::transport::CloseReason::normal("leaving"))
        .await;
    drop(c);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !node
        .admin_get("/healthz")
        .await
        .1
        .contains("\"sessions\":0")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the session never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until both nodes report healthy (broker and mailbox up).
async fn healthy(nodes: &[&TestRelay]) {
    for node in nodes {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let (status, body) = node.admin_get("/healthz").await;
            if status == 200 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "a node stayed unhealthy: {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Two relays with the NATS mailbox (a JetStream stream with `replicas = 3`) on a three-server
/// NATS cluster, and the server that leads the stream, the only address relay 0 was given, is
/// killed while messages wait in the mailbox for a recipient who is away. The relays stay up and reconnect
/// to the servers left; the stream, kept by the two others, still holds every entry answered
/// `stored`, and the recipient gets each of them, once, when they log in; new messages are
/// stored again (after at most a few `mailbox_unavailable` or `broker_unavailable` answers
/// while JetStream elects a new leader) and delivered, live and from the mailbox, on both
/// relays. A recipient with no session is never reported `delivered`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_ride_out_losing_a_nats_server_with_the_mailbox_on_it() {
    let mut nats = NatsCluster::start(3);
    nats.wait_jetstream_ready();
    let urls = nats.urls();
    let shared = tempfile::tempdir().unwrap();
    // Relay 1 knows every server and creates the stream; relay 0 is given only the server that
    // leads the stream, the one killed below.
    let n1 = jetstream_node(urls.join(","), shared.path()).await;
    let leader = nats.stream_leader("SYNCRA_MAILBOX");
    let n0 = jetstream_node(urls[leader].clone(), shared.path()).await;
    let (a, b) = (TestUser::new("ja"), TestUser::new("jb"));
    let (mut ca, _) = a.register(n0.url()).await;
    let (cb, _) = b.register(n1.url()).await;
    leave(cb, &n1).await;

    let mut id = 0;
    let mut send = async |ca: &mut RawClient, body: &[u8]| {
        id += 1;
        let out = tokio::time::timeout(DEADLINE, ca.send_envelope(id, a.seal(&[&b], body)))
            .await
            .expect("every send gets an answer, server or no server");
        out[0].outcome
    };
    // Held for B, who is away: every one `stored` (the cluster is whole).
    let mut stored = Vec::new();
    for i in 0..10 {
        let body = format!("held-{i:02}").into_bytes();
        assert_eq!(
            send(&mut ca, &body).await,
            Outcome::Stored,
            "before the kill"
        );
        stored.push(body);
    }

    nats.servers[leader].stop();
    // Until 10 in a row are stored again: the relay reconnected, and the stream has a leader.
    let deadline = tokio::time::Instant::now() + 3 * DEADLINE;
    let (mut in_a_row, mut i) = (0, 0);
    let mut refused = 0;
    while in_a_row < 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the mailbox did not resume after losing one NATS server ({refused} refused)"
        );
        let body = format!("after-{i:03}").into_bytes();
        i += 1;
        match send(&mut ca, &body).await {
            Outcome::Stored => {
                stored.push(body);
                in_a_row += 1;
            }
            Outcome::Rejected(ErrorCode::MailboxUnavailable | ErrorCode::BrokerUnavailable) => {
                refused += 1;
                in_a_row = 0;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!(
                "B is away: {:?} got {other:?}",
                String::from_utf8_lossy(&body)
            ),
        }
    }
    eprintln!("{refused} sends refused while the relays and JetStream recovered");
    healthy(&[&n0, &n1]).await;

    // B logs in on relay 1 and gets everything stored, before and after the kill, once.
    let mut cb = b.login(n1.url()).await;
    let mut inbox = Inbox::default();
    inbox.fill(&mut cb, &b, &stored).await;
    inbox.check_once(Kind::Nats);
    assert_eq!(inbox.bodies.len(), stored.len(), "nothing more arrived");

    // Live again across the relays (relay 0 reaches relay 1 through the servers left).
    let got = send_until(&mut ca, &a, &[&b], b"live", &[Outcome::Delivered]).await;
    assert_eq!(got, [Outcome::Delivered]);
    inbox.fill(&mut cb, &b, &[b"live".to_vec()]).await;

    // And stored again, and taken from the mailbox on relay 0, the one that lost its server.
    leave(cb, &n1).await;
    let mut later = Vec::new();
    for i in 0..5 {
        let body = format!("later-{i}").into_bytes();
        assert_eq!(
            send(&mut ca, &body).await,
            Outcome::Stored,
            "B is away again"
        );
        later.push(body);
    }
    let mut cb = b.login(n0.url()).await;
    let mut inbox = Inbox::default();
    inbox.fill(&mut cb, &b, &later).await;
    inbox.check_once(Kind::Nats);
    healthy(&[&n0, &n1]).await;
}

macro_rules! for_both {
    ($($name:ident),*) => {
        mod redis {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Kind::Redis).await })*
        }
        mod nats {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Kind::Nats).await })*
        }
    };
}

for_both!(
    two_nodes_exchange_and_report_truthfully,
    pipelined_sends_keep_their_order_across_nodes,
    a_user_on_two_nodes_receives_on_both,
    a_group_across_three_nodes,
    a_broker_outage_is_reported_and_recovers,
    a_login_racing_a_stream_loses_nothing,
    a_recipient_moving_nodes_mid_stream
);

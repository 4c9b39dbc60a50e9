//! Several relay nodes on one broker (Redis and NATS, the same tests for both) and one store:
//! cross-node delivery, a user on two nodes, truthful outcomes, resume on another node, and a
//! broker outage that never produces a false "delivered" and recovers by itself.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use std::path::Path;
use std::time::Duration;

use syncra_core::wire::{ErrorCode, Frame, Outcome};
use syncra_test_relay::{RawClient, TestRelay, TestUser, expect_auth_ok};
use syncra_test_support::DEADLINE;
use syncra_test_support::servers::{NatsServer, RedisServer};

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
    let (kind, url) = (server.kind(), server.url());
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

async fn a_user_on_two_nodes_receives_on_both(kind: Kind) {
    let cl = cluster(kind, 3).await;
    let (a, b) = (TestUser::new("ya"), TestUser::new("yb"));
    let (mut ca, _) = a.register(cl.nodes[0].url()).await;
    let (mut b1, _) = b.register(cl.nodes[1].url()).await;
    let mut b2 = b.login(cl.nodes[2].url()).await;
    let got = send_until(&mut ca, &a, &[&b], b"both of you", &[Outcome::Delivered]).await;
    assert_eq!(got, [Outcome::Delivered]);
    // Each of B's sessions gets the message (possibly after earlier retries' copies).
    for c in [&mut b1, &mut b2] {
        assert_eq!(b.open(&c.delivery().await), b"both of you");
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
    a_broker_outage_is_reported_and_recovers
);

//! The relay's trust boundaries, attacked as an outsider would, against real `syncra-relay`
//! processes: a broker publisher without the cluster key, a stolen resume token kept alive by
//! resuming, a deleted user's token, a server that passes another relay's challenge on, one
//! account that makes the relay amplify its sends, and handle enumeration before login. Each
//! attack is refused with its own code while other users keep being served.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use syncra_core::UserId;
use syncra_core::broker::BrokerSink;
use syncra_core::crypto::envelope::{Recipient, seal};
use syncra_core::crypto::keys::{IdentityKeyPair, PrekeySecret};
use syncra_core::transport::Transport;
use syncra_core::wire::{ErrorCode, Frame, Outcome, RecipientOutcome};
use syncra_test_relay::{RawClient, Received, TestUser, expect_auth_ok, http_get};
use syncra_test_support::DEADLINE;
use syncra_test_support::process::{RelayProcess, free_port, relay_binary};
use syncra_test_support::servers::{NatsServer, RedisServer};
use syncra_transport_ws::{WsConfig, WsTransport};

/// The value of a metric series (`name{labels}`), 0 if absent.
async fn metric(admin: SocketAddr, series: &str) -> u64 {
    let (status, body) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    let prefix = format!("{series} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Waits until `check` holds, polling; panics with `what` at the deadline.
async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends until the single outcome is `want` (a subscription on another node settles
/// asynchronously after login).
async fn send_until(c: &mut RawClient, from: &TestUser, to: &TestUser, body: &[u8], want: Outcome) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut id = 100;
    loop {
        id += 1;
        let got = c.send_envelope(id, from.seal(&[to], body)).await;
        if got[0].outcome == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never {want:?}: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The sink of an outsider listening on the presence topic: it learns the nodes' ids (the 16
/// bytes after every payload's MAC are sent in the clear), hence their delivery topics.
#[derive(Default)]
struct Eavesdropper {
    nodes: std::sync::Mutex<std::collections::BTreeSet<[u8; 16]>>,
}

impl BrokerSink for Eavesdropper {
    fn deliver(&self, _topic: &str, payload: Bytes) -> bool {
        if let Some(id) = payload
            .get(32..48)
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
        {
            self.nodes.lock().unwrap().insert(id);
        }
        false
    }
}

/// One node of a two-node cluster, as a process.
fn node(shared: &Path, name: &str, broker: &str, url: &str, admin: SocketAddr) -> RelayProcess {
    RelayProcess::start_with(
        &shared.join(name),
        &[
            ("SYNCRA_RELAY_ID", "trust-cluster"),
            ("SYNCRA_BROKER__KIND", broker),
            ("SYNCRA_BROKER__URL", url),
            (
                "SYNCRA_STORE__PATH",
                shared.join("identities.db").to_str().unwrap(),
            ),
            (
                "SYNCRA_AUTH__TOKEN_KEY_FILE",
                shared.join("token.key").to_str().unwrap(),
            ),
            ("SYNCRA_ADMIN_LISTEN", &admin.to_string()),
        ],
    )
}

/// Whoever can publish on the broker (here: an ordinary client of the same Redis or NATS
/// server, without the cluster key) publishes on each node's delivery topic and on the
/// presence topic what used to reach a user's sockets as is: a forged `Record` (which pinned an
/// attacker's key on a first contact), a forged `SendResult`, and a `Deliver` without a valid
/// MAC. None reaches the user, each is counted, and a real delivery from the other node still
/// arrives.
async fn broker_publishers_cannot_inject(broker: &str, url: &str) {
    let shared = tempfile::tempdir().unwrap();
    let admin_a: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let admin_b: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let a = node(shared.path(), "a", broker, url, admin_a);
    let b = node(shared.path(), "b", broker, url, admin_b);
    let (alice, bob, eve) = (
        TestUser::new("alice"),
        TestUser::new("bob"),
        TestUser::new("eve"),
    );
    let (mut ca, _) = alice.register(&a.url()).await;
    let (mut cb, _) = bob.register(&b.url()).await;
    let (_ce, _) = eve.register(&a.url()).await;

    // Bob on node B reaches Alice on node A: B has learnt where she is.
    send_until(&mut cb, &bob, &alice, b"first", Outcome::Delivered).await;

    let registry = syncra_relay::plugin_registry().unwrap();
    let ears = Arc::new(Eavesdropper::default());
    let attacker = registry
        .brokers
        .create(
            serde_json::json!({ "kind": broker, "url": url }),
            ears.clone() as Arc<dyn BrokerSink>,
        )
        .await
        .unwrap();
    attacker.subscribe("syncra.presence").await.unwrap();
    wait_for("the outsider hears both nodes' heartbeats", async || {
        ears.nodes.lock().unwrap().len() >= 2
    })
    .await;
    let mut topics = vec!["syncra.presence".to_owned()];
    for id in ears.nodes.lock().unwrap().iter() {
        topics.push(format!("syncra.n.{}", data_encoding::HEXLOWER.encode(id)));
    }
    let alice_user = alice.id();
    let alice_id: &[u8] = alice_user.as_bytes();
    let node_id = [7u8; 16];
    let forged_record = Frame::Record {
        request_id: 2,
        record: eve.record(),
    }
    .encode();
    let forged_result = Frame::SendResult {
        request_id: 3,
        message_id: [1; 16],
        outcomes: vec![RecipientOutcome {
            user_id: bob.id(),
            outcome: Outcome::Delivered,
        }],
    }
    .encode();
    let forged_deliver = Frame::Deliver {
        envelope: eve.seal(&[&alice], b"from the broker").into(),
    }
    .encode();
    let payloads = [
        // The format before the cluster key: node id, then any frame.
        [&node_id[..], &forged_record].concat(),
        [&node_id[..], &forged_result].concat(),
        // A made-up MAC, a node id, a well-formed delivery (kind 1, the user, the frame).
        [&[0u8; 32], &node_id[..], &[1], alice_id, &forged_deliver].concat(),
        [&[0u8; 32], &node_id[..], &[1], alice_id, &forged_record].concat(),
        // The same in the layout before `syncra/v4` (node id first, then the MAC).
        [&node_id[..], &[0u8; 32], &[1], alice_id, &forged_deliver].concat(),
        // A made-up presence announcement: "node 7 holds Alice".
        [&[0u8; 32], &node_id[..], &[2], &[0; 7], &[1, 1], alice_id].concat(),
    ];
    for topic in &topics {
        for payload in &payloads {
            attacker
                .publish(topic, Bytes::from(payload.clone()))
                .await
                .unwrap();
        }
    }
    // Each node gets every payload twice: on its own topic and on the presence topic.
    let forged_per_node = 2 * payloads.len() as u64;
    for admin in [admin_a, admin_b] {
        wait_for("each node drops every forged payload", async || {
            metric(
                admin,
                "syncra_relay_broker_dropped_total{reason=\"bad_mac\"}",
            )
            .await
                >= forged_per_node
        })
        .await;
    }

    // A real cross-node delivery still arrives, and it is the only thing Alice got.
    send_until(&mut cb, &bob, &alice, b"second", Outcome::Delivered).await;
    let mut bodies = Vec::new();
    while bodies.last().map(Vec::as_slice) != Some(b"second".as_slice()) {
        bodies.push(alice.open(&ca.delivery().await));
    }
    assert!(
        bodies.iter().all(|b| b == b"first" || b == b"second"),
        "only Bob's messages: {bodies:?}"
    );
    ca.send(&Frame::Ping { nonce: 9 }).await;
    assert!(matches!(ca.reply().await, Frame::Pong { nonce: 9 }));
    assert!(
        !ca.log
            .iter()
            .any(|f| matches!(f, Frame::Record { .. } | Frame::SendResult { .. })),
        "a forged answer reached the client: {:?}",
        ca.log
    );
    let log = a.log_text();
    assert_eq!(
        log.matches("dropped a payload from the broker (bad_mac)")
            .count(),
        1,
        "logged once per minute, not once per payload:\n{log}"
    );
    for admin in [admin_a, admin_b] {
        assert_eq!(
            metric(
                admin,
                "syncra_relay_broker_dropped_total{reason=\"bad_mac\"}"
            )
            .await,
            forged_per_node,
            "only the forged payloads were dropped: the nodes' own verify"
        );
    }
    // The cluster counters count what was authentic only: node A took Bob's deliveries in at
    // least one batch, node B (to which nobody sent) none, the forged "delivery" included.
    let (deliveries, batches) = (
        metric(admin_a, "syncra_relay_broker_in_total").await,
        metric(admin_a, "syncra_relay_broker_batches_in_total").await,
    );
    assert!(
        deliveries >= 2 && (1..=deliveries).contains(&batches),
        "node A: {deliveries} deliveries in {batches} batches"
    );
    for series in [
        "syncra_relay_broker_in_total",
        "syncra_relay_broker_batches_in_total",
    ] {
        assert_eq!(metric(admin_b, series).await, 0, "node B: {series}");
    }
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_publishers_without_the_cluster_key_cannot_reach_sessions() {
    let redis = RedisServer::start();
    broker_publishers_cannot_inject("redis", &redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_publishers_without_the_cluster_key_cannot_reach_sessions() {
    let nats = NatsServer::start();
    broker_publishers_cannot_inject("nats", &nats.url()).await;
}

/// Resumes with `token` on a fresh connection: the new token, or the refusal's code and
/// message.
async fn resume(url: &str, user: &TestUser, token: String) -> Result<String, (ErrorCode, String)> {
    let mut c = RawClient::connect(url).await;
    c.send(&Frame::Resume { token }).await;
    match c.reply().await {
        Frame::AuthOk { user_id, token, .. } => {
            assert_eq!(user_id, user.id());
            Ok(token)
        }
        Frame::Error { code, message, .. } => Err((code, message)),
        other => panic!("unexpected {other:?}"),
    }
}

/// A stolen token refreshed inside its TTL used to live for ever (every resume returned a
/// fresh token). Now every token carries the time of the last login with the key; past the
/// absolute lifetime the chain ends, and a login with the key starts a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_resumes_ends_at_the_absolute_session_lifetime() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start_with(
        &dir.path().join("relay"),
        &[
            ("SYNCRA_AUTH__TOKEN_TTL_SECS", "2"),
            ("SYNCRA_AUTH__SESSION_MAX_LIFETIME_SECS", "3"),
        ],
    );
    let url = relay.url();
    let alice = TestUser::new("alice");
    let (_c, mut token) = alice.register(&url).await;
    let mut resumes = 0;
    let refusal = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        match resume(&url, &alice, token.clone()).await {
            Ok(next) => {
                token = next;
                resumes += 1;
                assert!(resumes < 40, "the chain of resumes never ended");
            }
            Err(refusal) => break refusal,
        }
    };
    assert!(resumes >= 1, "a resume inside the lifetime works");
    assert_eq!(refusal.0, ErrorCode::TokenExpired, "{}", refusal.1);
    assert!(refusal.1.contains("log in again"), "{}", refusal.1);
    // The key still logs in, and the new chain resumes.
    let mut c = RawClient::connect(&url).await;
    c.send(&alice.auth_frame(&c)).await;
    let fresh = expect_auth_ok(&mut c, alice.id()).await;
    resume(&url, &alice, fresh).await.unwrap();
}

/// Deleting a user (the operator's `syncra-relay delete-user`) revokes its resume tokens, also
/// when the same identity registers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_user_revokes_its_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let relay = RelayProcess::start(&data);
    let url = relay.url();
    let alice = TestUser::new("alice");
    let (_c, token) = alice.register(&url).await;
    let again = resume(&url, &alice, token.clone()).await.unwrap();

    let out = std::process::Command::new(relay_binary())
        .env_clear()
        .env("SYNCRA_DATA_DIR", &data)
        .args(["delete-user", &alice.handle])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("revoked"));

    for t in [token.clone(), again.clone()] {
        let (code, message) = resume(&url, &alice, t).await.unwrap_err();
        assert_eq!(code, ErrorCode::TokenInvalid, "{message}");
        assert!(message.contains("revoked"), "{message}");
    }
    // The same identity registers again: a new generation, the old tokens stay dead.
    let (_c2, newest) = alice.register(&url).await;
    assert_eq!(
        resume(&url, &alice, token).await.unwrap_err().0,
        ErrorCode::TokenInvalid
    );
    resume(&url, &alice, newest).await.unwrap();
}

/// A server in the middle: accepts clients, dials the real relay for each, and passes frames
/// both ways unchanged — the relay's challenge to the client, the client's login to the relay.
async fn passthrough(relay_url: String) -> String {
    let transport = WsTransport::new(WsConfig::default()).unwrap();
    let mut listener = transport.bind("127.0.0.1:0").await.unwrap();
    let url = listener.url();
    tokio::spawn(async move {
        while let Ok(incoming) = listener.accept().await {
            let relay_url = relay_url.clone();
            tokio::spawn(async move {
                let Ok(client) = incoming.handshake.await else {
                    return;
                };
                let transport = WsTransport::new(WsConfig::default()).unwrap();
                let upstream = transport.connect(&relay_url).await.unwrap();
                let (mut client_sink, mut client_stream) = (client.sink, client.stream);
                let (mut up_sink, mut up_stream) = (upstream.sink, upstream.stream);
                let down = async move {
                    while let Some(Ok(f)) = up_stream.recv().await {
                        if client_sink.send(&[f]).await.is_err() {
                            break;
                        }
                    }
                };
                let up = async move {
                    while let Some(Ok(f)) = client_stream.recv().await {
                        if up_sink.send(&[f]).await.is_err() {
                            break;
                        }
                    }
                };
                tokio::join!(down, up);
            });
        }
    });
    url
}

/// A server that passes this relay's challenge on gets a login proof that names the URL the
/// client dialled (its own), which the relay refuses when it knows its public URLs. Without the
/// URL in the proof, the passed-on login succeeded and the middle server held a session as
/// the user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_passed_on_by_another_server_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let public = format!("ws://127.0.0.1:{port}/");
    let relay = RelayProcess::start_on(
        &dir.path().join("relay"),
        port,
        &[("SYNCRA_AUTH__PUBLIC_URLS", &format!("[\"{public}\"]"))],
    );
    assert_eq!(relay.url(), public);
    let alice = TestUser::new("alice");
    drop(alice.register(&public).await);

    let middle = passthrough(public.clone()).await;
    let mut victim = RawClient::connect(&middle).await;
    victim.send(&alice.auth_frame(&victim)).await;
    let message = victim.expect_error(ErrorCode::AuthFailed).await;
    assert!(
        message.contains("not an address of this relay"),
        "{message}"
    );

    // Dialled directly, the same user logs in.
    let mut direct = RawClient::connect(&public).await;
    direct.send(&alice.auth_frame(&direct)).await;
    expect_auth_ok(&mut direct, alice.id()).await;
}

fn stranger() -> Recipient {
    let key = IdentityKeyPair::generate();
    Recipient {
        user_id: UserId::from_identity_key(&key.public()),
        prekey: PrekeySecret::generate(&key, 1).signed().public,
    }
}

/// One account used to make the relay emit ~512 × its input (one token per send whatever the
/// recipient count). Now a send names at most `max_recipients_per_send` recipients and costs
/// size × recipients of a per-user byte budget, which reconnecting does not refill; others are
/// served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_is_budgeted_per_user_across_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start_with(
        &dir.path().join("relay"),
        &[
            ("SYNCRA_LIMITS__MAX_FRAME", "65536"),
            ("SYNCRA_LIMITS__MAX_RECIPIENTS_PER_SEND", "16"),
            ("SYNCRA_LIMITS__FANOUT_BURST_BYTES_PER_USER", "400000"),
            ("SYNCRA_LIMITS__FANOUT_BYTES_PER_SECOND_PER_USER", "1"),
        ],
    );
    let url = relay.url();
    let (mallory, bob, carol) = (
        TestUser::new("mallory"),
        TestUser::new("bob"),
        TestUser::new("carol"),
    );
    let (mut cm, _) = mallory.register(&url).await;
    let (mut cb, _) = bob.register(&url).await;
    let (mut cc, _) = carol.register(&url).await;
    // Padded to 16 KiB: an envelope to 16 recipients is about 18 KB, so one send costs ~290 KB.
    let body = vec![b'x'; 12_000];
    let sealed = |n: usize| {
        let to: Vec<Recipient> = (0..n).map(|_| stranger()).collect();
        seal(&mallory.identity, &to, &body, syncra_core::now_ms())
            .unwrap()
            .bytes
    };
    let send = async |c: &mut RawClient, id: u32, envelope: Vec<u8>| {
        c.send(&Frame::Send {
            request_id: id,
            envelope: envelope.into(),
        })
        .await;
        c.reply().await
    };
    let code = |f: Frame| match f {
        Frame::Error { code, message, .. } => (code, message),
        other => panic!("expected a refusal, got {other:?}"),
    };

    // More recipients than the cap: refused whatever the budget.
    let (c, m) = code(send(&mut cm, 1, sealed(17)).await);
    assert_eq!(c, ErrorCode::TooManyRecipients, "{m}");
    assert!(m.contains("at most 16"), "{m}");
    // 16 × ~18 KB fits in the 400 KB burst once…
    assert!(matches!(
        send(&mut cm, 2, sealed(16)).await,
        Frame::SendResult { .. }
    ));
    // …not twice: the relay will not emit another 16 copies now.
    let (c, m) = code(send(&mut cm, 3, sealed(16)).await);
    assert_eq!(c, ErrorCode::RateLimited, "{m}");
    assert!(m.contains("message size × recipients"), "{m}");
    // Reconnecting does not refill it.
    drop(cm);
    let mut again = mallory.login(&url).await;
    let (c, _) = code(send(&mut again, 4, sealed(16)).await);
    assert_eq!(c, ErrorCode::RateLimited);

    // Everyone else is served meanwhile.
    let got = cb
        .send_envelope(1, bob.seal(&[&carol], b"still here"))
        .await;
    assert_eq!(got[0].outcome, Outcome::Delivered);
    assert_eq!(carol.open(&cc.delivery().await), b"still here");
}

/// Handle lookups before login have their own budget, stricter than frames in general, so the
/// directory cannot be enumerated without an account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handle_lookups_before_login_are_budgeted() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start_with(
        &dir.path().join("relay"),
        &[("SYNCRA_AUTH__LOOKUPS_PER_MINUTE_PER_ADDRESS", "5")],
    );
    let url = relay.url();
    let alice = TestUser::new("alice");
    let (mut ca, _) = alice.register(&url).await;
    let mut probe = RawClient::connect(&url).await;
    for i in 0..5 {
        probe
            .send(&Frame::LookupHandle {
                request_id: i + 1,
                handle: format!("guess{i}"),
            })
            .await;
        probe.expect_error(ErrorCode::NotFound).await;
    }
    probe
        .send(&Frame::LookupHandle {
            request_id: 9,
            handle: alice.handle.clone(),
        })
        .await;
    let message = probe.expect_error(ErrorCode::RateLimited).await;
    assert!(message.contains("before logging in"), "{message}");
    // A new connection from the same address does not get a fresh budget…
    let mut again = RawClient::connect(&url).await;
    again
        .send(&Frame::LookupHandle {
            request_id: 1,
            handle: alice.handle.clone(),
        })
        .await;
    again.expect_error(ErrorCode::RateLimited).await;
    // …while a logged-in user looks handles up as before.
    ca.send(&Frame::LookupHandle {
        request_id: 1,
        handle: alice.handle.clone(),
    })
    .await;
    assert!(matches!(ca.reply().await, Frame::Record { .. }));
    // The unauthenticated connection is still open (refused, not cut).
    probe.send(&Frame::Ping { nonce: 1 }).await;
    assert!(matches!(
        probe.recv().await,
        Received::Frame(Frame::Pong { .. })
    ));
}

//! The relay as a blind MLS delivery service, over real sockets (docs/PROTOCOL.md §9): the
//! KeyPackage directory, one accepted commit per group epoch, members only, the current epoch
//! only, and handshakes delivered in order through the mailbox to members who are offline.
//!
//! The relay never reads an MLS message, so the carriages here hold opaque bodies; the client
//! tests (`host-client/tests/mls_relay.rs`) carry real MLS messages through the same rules.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use bytes::Bytes;
use syncra_core::carriage::{CarriageHeader, CarriageKind, GROUP_ID_LEN, GroupId};
use syncra_core::wire::{ErrorCode, Frame, Outcome, RequestId};
use syncra_test_relay::{RawClient, TestRelay, TestUser, expect_auth_ok};

fn group() -> GroupId {
    let mut id = [0u8; GROUP_ID_LEN];
    syncra_core::crypto::fill_random(&mut id);
    GroupId(id)
}

fn carriage(
    kind: CarriageKind,
    group: GroupId,
    epoch: u64,
    recipients: &[&TestUser],
    members: &[&TestUser],
    body: &[u8],
) -> Vec<u8> {
    let mut message_id = [0u8; 16];
    syncra_core::crypto::fill_random(&mut message_id);
    CarriageHeader {
        message_id,
        kind,
        group_id: group,
        epoch,
        recipients: recipients.iter().map(|u| u.id()).collect(),
        members: members.iter().map(|u| u.id()).collect(),
    }
    .encode(body)
}

/// Sends a carriage; the send result's outcomes, or the error code and message.
async fn send(
    c: &mut RawClient,
    request_id: RequestId,
    bytes: &[u8],
) -> Result<Vec<Outcome>, (ErrorCode, String)> {
    c.send(&Frame::Send {
        request_id,
        envelope: Bytes::copy_from_slice(bytes),
    })
    .await;
    answer(c, request_id).await
}

async fn answer(
    c: &mut RawClient,
    request_id: RequestId,
) -> Result<Vec<Outcome>, (ErrorCode, String)> {
    match c.reply().await {
        Frame::SendResult {
            request_id: r,
            outcomes,
            ..
        } => {
            assert_eq!(r, request_id);
            Ok(outcomes.into_iter().map(|o| o.outcome).collect())
        }
        Frame::Error {
            request_id: r,
            code,
            message,
        } => {
            assert_eq!(r, request_id);
            Err((code, message))
        }
        other => panic!("expected a send result or an error, got {other:?}"),
    }
}

fn refused(result: Result<Vec<Outcome>, (ErrorCode, String)>, code: ErrorCode) -> String {
    match result {
        Err((got, message)) => {
            assert_eq!(got, code, "{message}");
            message
        }
        Ok(outcomes) => panic!("expected {code:?}, the carriage was routed: {outcomes:?}"),
    }
}

/// The MLS message of the next delivered carriage.
async fn body(c: &mut RawClient) -> Vec<u8> {
    let bytes = c.delivery().await;
    syncra_core::carriage::parse(&bytes).unwrap().body.to_vec()
}

/// Logs `user` in and returns the MLS messages of the backlog its mailbox sends, in order.
async fn backlog_at_login(relay: &TestRelay, user: &TestUser) -> Vec<Vec<u8>> {
    let mut c = RawClient::connect(relay.url()).await;
    c.send(&user.auth_frame(&c)).await;
    expect_auth_ok(&mut c, user.id()).await;
    let mut backlog = Vec::new();
    loop {
        match c.frame().await {
            Frame::Pending { envelope, .. } => backlog.push(
                syncra_core::carriage::parse(&envelope)
                    .unwrap()
                    .body
                    .to_vec(),
            ),
            Frame::PendingEnd { .. } => break,
            other => panic!("expected the backlog, got {other:?}"),
        }
    }
    backlog
}

async fn users(relay: &TestRelay, names: &[&str]) -> Vec<(TestUser, RawClient)> {
    let mut out = Vec::new();
    for name in names {
        let user = TestUser::new(name);
        let (client, _) = user.register(relay.url()).await;
        out.push((user, client));
    }
    out
}

#[tokio::test]
async fn the_key_package_directory_hands_out_each_package_once_then_the_last_resort() {
    let relay = TestRelay::start(|_| {}).await;
    let mut all = users(&relay, &["kp_alice", "kp_bob"]).await;
    let (bob, mut cb) = all.pop().unwrap();
    let (alice, mut ca) = all.pop().unwrap();

    let one_time: Vec<Bytes> = vec![Bytes::from_static(b"kp-1"), Bytes::from_static(b"kp-2")];
    ca.send(&Frame::PublishKeyPackages {
        request_id: 1,
        last_resort: Some(Bytes::from_static(b"kp-last")),
        one_time: one_time.clone(),
    })
    .await;
    assert_eq!(
        ca.reply().await,
        Frame::KeyPackages {
            request_id: 1,
            one_time: 2,
            last_resort: true
        }
    );
    let mut claimed = Vec::new();
    for request_id in 10..14 {
        cb.send(&Frame::ClaimKeyPackage {
            request_id,
            user_id: alice.id(),
        })
        .await;
        match cb.reply().await {
            Frame::KeyPackage {
                request_id: r,
                user_id,
                last_resort,
                package,
            } => {
                assert_eq!((r, user_id), (request_id, alice.id()));
                claimed.push((package, last_resort));
            }
            other => panic!("expected a KeyPackage, got {other:?}"),
        }
    }
    let last = (Bytes::from_static(b"kp-last"), true);
    assert_eq!(
        claimed,
        vec![
            (one_time[0].clone(), false),
            (one_time[1].clone(), false),
            last.clone(),
            last
        ],
        "one-time packages once each, oldest first, then the last resort (kept)"
    );
    // Publishing nothing asks for the count.
    ca.send(&Frame::PublishKeyPackages {
        request_id: 2,
        last_resort: None,
        one_time: vec![],
    })
    .await;
    assert_eq!(
        ca.reply().await,
        Frame::KeyPackages {
            request_id: 2,
            one_time: 0,
            last_resort: true
        }
    );

    // Nobody published: not_found, with who in the message.
    cb.send(&Frame::ClaimKeyPackage {
        request_id: 20,
        user_id: bob.id(),
    })
    .await;
    let why = cb.expect_error(ErrorCode::NotFound).await;
    assert!(why.contains("no KeyPackage"), "{why}");

    // More than a user may keep: refused whole, with the limit named.
    let many: Vec<Bytes> = (0..100).map(|i| Bytes::from(format!("kp-{i}"))).collect();
    ca.send(&Frame::PublishKeyPackages {
        request_id: 3,
        last_resort: None,
        one_time: many.clone(),
    })
    .await;
    assert!(matches!(
        ca.reply().await,
        Frame::KeyPackages { one_time: 100, .. }
    ));
    ca.send(&Frame::PublishKeyPackages {
        request_id: 4,
        last_resort: None,
        one_time: many[..1].to_vec(),
    })
    .await;
    let why = ca.expect_error(ErrorCode::BadKeyPackage).await;
    assert!(why.contains("at most 100"), "{why}");
}

#[tokio::test]
async fn exactly_one_of_two_concurrent_commits_wins_and_the_loser_commits_again() {
    let relay = TestRelay::start(|_| {}).await;
    let mut all = users(&relay, &["ep_alice", "ep_bob", "ep_carol"]).await;
    let (carol, mut cc) = all.pop().unwrap();
    let (bob, mut cb) = all.pop().unwrap();
    let (alice, mut ca) = all.pop().unwrap();
    let g = group();
    let everyone = [&alice, &bob, &carol];

    // The group's first commit claims epoch 0 (nobody else is in it yet to receive it).
    let created = carriage(CarriageKind::Commit, g, 0, &[], &everyone, b"create");
    assert_eq!(send(&mut ca, 1, &created).await.unwrap(), vec![]);

    // Bob and Carol commit in epoch 1 at the same moment.
    let from_bob = carriage(
        CarriageKind::Commit,
        g,
        1,
        &[&alice, &carol],
        &everyone,
        b"bob's",
    );
    let from_carol = carriage(
        CarriageKind::Commit,
        g,
        1,
        &[&alice, &bob],
        &everyone,
        b"carol's",
    );
    cb.send(&Frame::Send {
        request_id: 2,
        envelope: from_bob.into(),
    })
    .await;
    cc.send(&Frame::Send {
        request_id: 2,
        envelope: from_carol.into(),
    })
    .await;
    let (bob_answer, carol_answer) = tokio::join!(answer(&mut cb, 2), answer(&mut cc, 2));
    let (winner, mut loser_client, loser) = match (bob_answer, carol_answer) {
        (Ok(_), Err(e)) => {
            refused(Err(e), ErrorCode::CommitConflict);
            (b"bob's".to_vec(), cc, &carol)
        }
        (Err(e), Ok(_)) => {
            refused(Err(e), ErrorCode::CommitConflict);
            (b"carol's".to_vec(), cb, &bob)
        }
        other => panic!("exactly one commit must win epoch 1: {other:?}"),
    };
    // Everyone else gets the winning commit, the loser included, so it can rebase.
    assert_eq!(body(&mut ca).await, winner);
    assert_eq!(body(&mut loser_client).await, winner);

    // The loser commits again in epoch 2: accepted, and Alice gets it next, in order.
    let others: Vec<&TestUser> = everyone
        .iter()
        .copied()
        .filter(|u| u.id() != loser.id())
        .collect();
    let again = carriage(CarriageKind::Commit, g, 2, &others, &everyone, b"rebased");
    let outcomes = send(&mut loser_client, 3, &again).await.unwrap();
    assert_eq!(outcomes, vec![Outcome::Delivered; 2]);
    assert_eq!(body(&mut ca).await, b"rebased");
}

#[tokio::test]
async fn messages_from_other_epochs_outsiders_and_unknown_groups_are_refused_by_name() {
    use CarriageKind::{Application, Commit, Proposal, Rejoin, Welcome};
    let relay = TestRelay::start(|_| {}).await;
    let mut all = users(&relay, &["rule_alice", "rule_bob", "rule_dave"]).await;
    let (dave, cd) = all.pop().unwrap();
    let (bob, mut cb) = all.pop().unwrap();
    let (alice, mut ca) = all.pop().unwrap();
    let g = group();
    let commit = carriage(Commit, g, 0, &[&bob], &[&alice, &bob], b"c0");
    assert_eq!(
        send(&mut ca, 1, &commit).await.unwrap(),
        vec![Outcome::Delivered]
    );
    assert_eq!(body(&mut cb).await, b"c0");

    let cases: Vec<(&str, usize, Vec<u8>, ErrorCode, &str)> = vec![
        (
            "an application message from a left epoch",
            0,
            carriage(Application, g, 0, &[&bob], &[], b"old"),
            ErrorCode::WrongEpoch,
            "made in epoch 0",
        ),
        (
            "a proposal from a future epoch",
            1,
            carriage(Proposal, g, 5, &[&alice], &[], b"future"),
            ErrorCode::WrongEpoch,
            "is at epoch 1",
        ),
        (
            "a message from someone outside the group",
            2,
            carriage(Application, g, 1, &[&alice], &[], b"hi"),
            ErrorCode::NotAMember,
            "not a member",
        ),
        (
            "a member writing to someone outside the group",
            0,
            carriage(Application, g, 1, &[&dave], &[], b"psst"),
            ErrorCode::NotAMember,
            "recipient",
        ),
        (
            "a Welcome to someone the last commit did not add",
            0,
            carriage(Welcome, g, 1, &[&dave], &[], b"welcome"),
            ErrorCode::NotAMember,
            "recipient",
        ),
        (
            "a commit whose members leave out its sender",
            0,
            carriage(Commit, g, 1, &[&bob], &[&bob], b"self-removal"),
            ErrorCode::NotAMember,
            "include its sender",
        ),
        (
            "a commit by an outsider",
            2,
            carriage(Commit, g, 1, &[&alice], &[&alice, &dave], b"takeover"),
            ErrorCode::NotAMember,
            "not a member",
        ),
        (
            "a commit for an epoch the group left",
            1,
            carriage(Commit, g, 0, &[&alice], &[&alice, &bob], b"late"),
            ErrorCode::CommitConflict,
            "another commit won epoch 0",
        ),
        (
            "a message to a group no commit created",
            0,
            carriage(Application, group(), 0, &[&bob], &[], b"?"),
            ErrorCode::NotAMember,
            "no commit created",
        ),
        (
            "a rejoin request from an epoch the group never reached",
            1,
            carriage(Rejoin, g, 2, &[&alice], &[], b"from the future"),
            ErrorCode::WrongEpoch,
            "is at epoch 1",
        ),
        (
            "a rejoin request from someone outside the group",
            2,
            carriage(Rejoin, g, 0, &[&alice], &[], b"let me in"),
            ErrorCode::NotAMember,
            "not a member",
        ),
        (
            "a rejoin request to someone outside the group",
            1,
            carriage(Rejoin, g, 0, &[&dave], &[], b"psst"),
            ErrorCode::NotAMember,
            "recipient",
        ),
        (
            "a new group's first commit made in a later epoch",
            0,
            carriage(Commit, group(), 3, &[], &[&alice], b"skip"),
            ErrorCode::CommitConflict,
            "epoch 0, not 3",
        ),
    ];
    let mut clients = [ca, cb, cd];
    for (i, (what, who, bytes, code, says)) in cases.into_iter().enumerate() {
        let why = refused(send(&mut clients[who], 100 + i as u32, &bytes).await, code);
        assert!(why.contains(says), "{what}: {why:?} should say {says:?}");
    }
    let [mut ca, mut cb, _] = clients;
    // A carriage whose shape is wrong is a bad envelope, like a bad sealed envelope.
    let mut bad = carriage(Application, g, 1, &[&bob], &[], b"x");
    bad[17] = 9; // the kind byte
    let why = refused(send(&mut ca, 200, &bad).await, ErrorCode::BadEnvelope);
    assert!(why.contains("unknown carriage kind"), "{why}");

    // Nothing refused reached anyone, the group is still at epoch 1, and it still works.
    let fine = carriage(Application, g, 1, &[&bob], &[], b"still here");
    assert_eq!(
        send(&mut ca, 300, &fine).await.unwrap(),
        vec![Outcome::Delivered]
    );
    assert_eq!(body(&mut cb).await, b"still here");
    let fine = carriage(Application, g, 1, &[&alice], &[], b"me too");
    assert_eq!(
        send(&mut cb, 301, &fine).await.unwrap(),
        vec![Outcome::Delivered]
    );
    assert_eq!(body(&mut ca).await, b"me too");
    // A member whose copy is stuck in an epoch the group left asks to be let back in: the one
    // carriage made in a left epoch that is routed (docs/PROTOCOL.md §9.7, rule 3).
    let stuck = carriage(Rejoin, g, 0, &[&alice], &[], b"let me back in");
    assert_eq!(
        send(&mut cb, 302, &stuck).await.unwrap(),
        vec![Outcome::Delivered]
    );
    assert_eq!(body(&mut ca).await, b"let me back in");
}

#[tokio::test]
async fn the_winning_commit_sent_again_is_routed_and_a_rival_is_still_refused() {
    let relay = TestRelay::start(|_| {}).await;
    let mut all = users(&relay, &["re_alice", "re_bob"]).await;
    let (bob, mut cb) = all.pop().unwrap();
    let (alice, mut ca) = all.pop().unwrap();
    let g = group();
    let commit = carriage(CarriageKind::Commit, g, 0, &[&bob], &[&alice, &bob], b"c0");
    assert_eq!(
        send(&mut ca, 1, &commit).await.unwrap(),
        vec![Outcome::Delivered]
    );
    // Alice's outbox could not tell whether Bob got it (a lost answer): she sends it again.
    assert_eq!(
        send(&mut ca, 2, &commit).await.unwrap(),
        vec![Outcome::Delivered]
    );
    assert_eq!(body(&mut cb).await, b"c0");
    assert_eq!(body(&mut cb).await, b"c0", "the same commit, routed twice");
    let rival = carriage(
        CarriageKind::Commit,
        g,
        0,
        &[&alice],
        &[&alice, &bob],
        b"rival",
    );
    refused(send(&mut cb, 3, &rival).await, ErrorCode::CommitConflict);
}

#[tokio::test]
async fn a_member_offline_across_several_commits_catches_up_in_order_from_the_mailbox() {
    let relay = TestRelay::start(|_| {}).await;
    let mut all = users(&relay, &["off_alice", "off_bob"]).await;
    let (bob, cb) = all.pop().unwrap();
    let (alice, mut ca) = all.pop().unwrap();
    drop(cb);
    let g = group();
    let both = [&alice, &bob];
    let sent: Vec<Vec<u8>> = vec![
        carriage(CarriageKind::Commit, g, 0, &[&bob], &both, b"commit 0"),
        carriage(
            CarriageKind::Application,
            g,
            1,
            &[&bob],
            &[],
            b"message in 1",
        ),
        carriage(CarriageKind::Commit, g, 1, &[&bob], &both, b"commit 1"),
        carriage(
            CarriageKind::Application,
            g,
            2,
            &[&bob],
            &[],
            b"message in 2",
        ),
        carriage(CarriageKind::Commit, g, 2, &[&bob], &both, b"commit 2"),
        carriage(
            CarriageKind::Application,
            g,
            3,
            &[&bob],
            &[],
            b"message in 3",
        ),
    ];
    // Bob's session may still be closing: until the relay sees it gone, a send is delivered to
    // it; wait for the first `stored` before the rest.
    loop {
        let probe = carriage(CarriageKind::Commit, group(), 0, &[&bob], &both, b"probe");
        if send(&mut ca, 1, &probe).await.unwrap() == vec![Outcome::Stored] {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for (i, bytes) in sent.iter().enumerate() {
        assert_eq!(
            send(&mut ca, 10 + i as u32, bytes).await.unwrap(),
            vec![Outcome::Stored],
            "carriage {i}"
        );
    }
    let backlog = backlog_at_login(&relay, &bob).await;
    let expected: Vec<Vec<u8>> = std::iter::once(b"probe".to_vec())
        .chain(
            sent.iter()
                .map(|b| syncra_core::carriage::parse(b).unwrap().body.to_vec()),
        )
        .collect();
    // Probes that found Bob still connected went to his closing session; the one stored is first.
    assert_eq!(
        backlog, expected,
        "handshakes and messages arrive in the order they were accepted"
    );
}

#[tokio::test]
async fn pipelined_carriages_are_routed_in_the_order_they_were_sent() {
    let relay = TestRelay::start(|_| {}).await;
    let mut all = users(&relay, &["pipe_alice", "pipe_bob"]).await;
    let (bob, mut cb) = all.pop().unwrap();
    let (alice, mut ca) = all.pop().unwrap();
    let g = group();
    let both = [&alice, &bob];
    // Alice sends commits and the messages of each new epoch back to back, without waiting for
    // answers: each message must meet the epoch its commit made, and Bob gets them in order.
    let mut sent = Vec::new();
    for epoch in 0..5u64 {
        let body = format!("commit {epoch}").into_bytes();
        sent.push((
            carriage(CarriageKind::Commit, g, epoch, &[&bob], &both, &body),
            body,
        ));
        for n in 0..4 {
            let body = format!("message {n} in {}", epoch + 1).into_bytes();
            sent.push((
                carriage(CarriageKind::Application, g, epoch + 1, &[&bob], &[], &body),
                body,
            ));
        }
    }
    for (i, (bytes, _)) in sent.iter().enumerate() {
        ca.send(&Frame::Send {
            request_id: i as u32 + 1,
            envelope: Bytes::copy_from_slice(bytes),
        })
        .await;
    }
    for i in 0..sent.len() {
        let outcomes = answer(&mut ca, i as u32 + 1).await;
        assert_eq!(
            outcomes.map_err(|(code, why)| format!("{code:?}: {why}")),
            Ok(vec![Outcome::Delivered]),
            "carriage {i}"
        );
    }
    for (i, (_, expected)) in sent.iter().enumerate() {
        assert_eq!(&body(&mut cb).await, expected, "delivery {i}");
    }
}

/// A relay alone on its broker (the in-process one) is the only one that moves its groups, so
/// it checks carriages against what it knows of them instead of reading its store for every
/// message (`groups.rs`, `GroupCache`). Shown with its PostgreSQL store frozen: messages in a
/// known group still pass and arrive, every rule still refuses by name, and only a commit —
/// which must claim its epoch in the store — fails, as `store_unavailable`. Once the store is
/// back, the next commit moves the group, and the relay follows it: the left epoch is refused,
/// the new one passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_alone_checks_known_groups_without_asking_its_store() {
    let mut pg = syncra_test_support::postgres::PostgresServer::start();
    let url = pg.url();
    let relay = TestRelay::start(|c| {
        c.store = serde_json::json!({ "kind": "postgres", "url": url });
    })
    .await;
    let mut all = users(&relay, &["gc_alice", "gc_bob", "gc_carol"]).await;
    let (carol, mut cc) = all.pop().unwrap();
    let (bob, mut cb) = all.pop().unwrap();
    let (alice, mut ca) = all.pop().unwrap();
    let g = group();
    let create = carriage(
        CarriageKind::Commit,
        g,
        0,
        &[&bob],
        &[&alice, &bob],
        b"commit 0",
    );
    assert_eq!(
        send(&mut ca, 1, &create).await.unwrap(),
        [Outcome::Delivered]
    );
    assert_eq!(body(&mut cb).await, b"commit 0");

    pg.pause();
    let hello = carriage(CarriageKind::Application, g, 1, &[&bob], &[], b"hello");
    assert_eq!(
        send(&mut ca, 2, &hello).await.unwrap(),
        [Outcome::Delivered]
    );
    assert_eq!(body(&mut cb).await, b"hello");
    for epoch in [0, 2] {
        let m = carriage(CarriageKind::Application, g, epoch, &[&bob], &[], b"x");
        refused(send(&mut ca, 3, &m).await, ErrorCode::WrongEpoch);
    }
    let outsider = carriage(CarriageKind::Application, g, 1, &[&alice], &[], b"x");
    refused(send(&mut cc, 4, &outsider).await, ErrorCode::NotAMember);
    let to_outsider = carriage(CarriageKind::Application, g, 1, &[&carol], &[], b"x");
    refused(send(&mut ca, 5, &to_outsider).await, ErrorCode::NotAMember);
    let add_carol = carriage(
        CarriageKind::Commit,
        g,
        1,
        &[&bob, &carol],
        &[&alice, &bob, &carol],
        b"commit 1",
    );
    refused(
        send(&mut ca, 6, &add_carol).await,
        ErrorCode::StoreUnavailable,
    );

    pg.resume();
    assert_eq!(
        send(&mut ca, 7, &add_carol).await.unwrap(),
        [Outcome::Delivered, Outcome::Delivered]
    );
    assert_eq!(body(&mut cb).await, b"commit 1");
    assert_eq!(body(&mut cc).await, b"commit 1");
    refused(send(&mut cb, 8, &hello).await, ErrorCode::WrongEpoch);
    let hi = carriage(
        CarriageKind::Application,
        g,
        2,
        &[&alice, &carol],
        &[],
        b"hi",
    );
    assert_eq!(
        send(&mut cb, 9, &hi).await.unwrap(),
        [Outcome::Delivered, Outcome::Delivered]
    );
    assert_eq!(body(&mut ca).await, b"hi");
    assert_eq!(body(&mut cc).await, b"hi");
}

/// A sender's messages and the commit it sends right after them, pipelined (no waiting for
/// answers), reach an offline member's mailbox in the order they were sent — on a PostgreSQL
/// mailbox, whose puts run on several connections at once. Messages in a known group are
/// routed on the spot and stored in their own time; the commit, which must claim its epoch in
/// the store, starts only once they are stored, so it cannot overtake them (the member would
/// process it first and could not read them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_never_overtakes_its_senders_earlier_messages_in_a_mailbox() {
    let pg = syncra_test_support::postgres::PostgresServer::start();
    let url = pg.url();
    let relay = TestRelay::start(|c| {
        c.store = serde_json::json!({ "kind": "postgres", "url": url });
        c.mailbox = serde_json::json!({ "kind": "postgres", "url": url });
    })
    .await;
    let mut all = users(&relay, &["ord_alice", "ord_bob"]).await;
    let (bob, cb) = all.pop().unwrap();
    let (alice, mut ca) = all.pop().unwrap();
    drop(cb);
    let both = [&alice, &bob];
    // Bob's session may still be closing: wait for the first `stored`.
    let g = loop {
        let g = group();
        let create = carriage(CarriageKind::Commit, g, 0, &[&bob], &both, b"commit 0");
        if send(&mut ca, 1, &create).await.unwrap() == vec![Outcome::Stored] {
            break g;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let mut sent = Vec::new();
    for round in 1..=3u64 {
        for i in 0..12 {
            let text = format!("message {i} in {round}");
            sent.push(carriage(
                CarriageKind::Application,
                g,
                round,
                &[&bob],
                &[],
                text.as_bytes(),
            ));
        }
        let text = format!("commit {round}");
        sent.push(carriage(
            CarriageKind::Commit,
            g,
            round,
            &[&bob],
            &both,
            text.as_bytes(),
        ));
    }
    for (i, bytes) in sent.iter().enumerate() {
        ca.send(&Frame::Send {
            request_id: 100 + i as u32,
            envelope: Bytes::copy_from_slice(bytes),
        })
        .await;
    }
    for i in 0..sent.len() {
        assert_eq!(
            answer(&mut ca, 100 + i as u32).await.unwrap(),
            vec![Outcome::Stored],
            "carriage {i}"
        );
    }
    let backlog = backlog_at_login(&relay, &bob).await;
    // Messages of one epoch may be stored in any order among themselves (MLS reads them so);
    // what matters is that each commit comes after every message sent before it.
    let bodies: Vec<Vec<u8>> = std::iter::once(b"commit 0".to_vec())
        .chain(
            sent.iter()
                .map(|b| syncra_core::carriage::parse(b).unwrap().body.to_vec()),
        )
        .collect();
    let mut got = backlog.clone();
    got.sort();
    let mut want = bodies.clone();
    want.sort();
    assert_eq!(got, want, "everything stored once");
    for round in 1..=3u64 {
        let commit = format!("commit {round}").into_bytes();
        let at = backlog.iter().position(|b| *b == commit).unwrap();
        for i in 0..12 {
            let message = format!("message {i} in {round}").into_bytes();
            let m = backlog.iter().position(|b| *b == message).unwrap();
            assert!(
                m < at,
                "message {i} in {round} after its commit: {backlog:?}"
            );
        }
        if round > 1 {
            let before = format!("commit {}", round - 1).into_bytes();
            assert!(backlog.iter().position(|b| *b == before).unwrap() < at);
        }
    }
}

//! The relay over real sockets: registration, login, resume, lookups, routing, limits, health,
//! shutdown — and for each bad input its error code, with the relay still serving others.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use syncra_core::crypto::keys::{PrekeyRing, PrekeySecret};
use syncra_core::wire::{ErrorCode, Frame, Outcome, PROTOCOL_VERSION};
use syncra_test_relay::{RawClient, Received, TestRelay, TestUser, expect_auth_ok};

/// Opens an envelope as `user` and returns the body.
/// Two fresh users exchange a message both ways: proof the relay still serves everyone.
async fn still_serving(relay: &TestRelay) {
    let (a, b) = (TestUser::new("alive_a"), TestUser::new("alive_b"));
    let (mut ca, _) = a.register(relay.url()).await;
    let (mut cb, _) = b.register(relay.url()).await;
    let out = ca.send_envelope(1, a.seal(&[&b], b"ping")).await;
    assert_eq!(out[0].outcome, Outcome::Delivered);
    assert_eq!(b.open(&cb.delivery().await), b"ping");
    let out = cb.send_envelope(1, b.seal(&[&a], b"pong")).await;
    assert_eq!(out[0].outcome, Outcome::Delivered);
    assert_eq!(a.open(&ca.delivery().await), b"pong");
}

/// Collects everything the relay logs during a test.
#[derive(Clone, Default)]
struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn two_users_exchange_sealed_messages_and_the_relay_sees_no_plaintext() {
    // A global subscriber: tracing caches per-callsite interest process-wide, so a
    // thread-local one would miss events whose callsites other tests hit first. Other tests'
    // logs land in the capture too, which only makes the check stricter.
    let capture = LogCapture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).expect("only this test sets one");

    let relay = TestRelay::start(|_| {}).await;
    let (alice, bob) = (TestUser::new("alice"), TestUser::new("bob"));
    let (mut ca, _) = alice.register(relay.url()).await;
    let (mut cb, _) = bob.register(relay.url()).await;

    // Alice finds Bob by handle and checks the record herself.
    ca.send(&Frame::LookupHandle {
        request_id: 9,
        handle: bob.handle.clone(),
    })
    .await;
    let record = match ca.reply().await {
        Frame::Record {
            request_id: 9,
            record,
        } => record,
        other => panic!("expected bob's record, got {other:?}"),
    };
    record.verify().unwrap();
    assert_eq!(record, bob.record());

    let secret = b"the eagle lands at dawn";
    let envelope = alice.seal(&[&bob], secret);
    let sent_frame = Frame::Send {
        request_id: 1,
        envelope: envelope.clone().into(),
    }
    .encode();
    assert!(
        !sent_frame.windows(secret.len()).any(|w| w == secret),
        "the frame the relay receives must not contain the plaintext"
    );
    let outcomes = ca.send_envelope(1, envelope).await;
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0].user_id, bob.id());
    assert_eq!(outcomes[0].outcome, Outcome::Delivered);
    assert_eq!(bob.open(&cb.delivery().await), secret);

    let reply = b"copy that";
    let outcomes = cb.send_envelope(2, bob.seal(&[&alice], reply)).await;
    assert_eq!(outcomes[0].outcome, Outcome::Delivered);
    assert_eq!(alice.open(&ca.delivery().await), reply);

    let logs = capture.0.lock().unwrap().clone();
    assert!(
        !logs.is_empty(),
        "the relay logged something at trace level"
    );
    for needle in [&secret[..], &reply[..]] {
        assert!(!logs.windows(needle.len()).any(|w| w == needle));
    }
}

#[tokio::test]
async fn offline_recipient_and_group_outcomes_are_per_recipient() {
    // The strict relay (no mailbox): what is not taken live is `offline`.
    let relay = TestRelay::start(|c| c.mailbox = serde_json::json!({ "kind": "none" })).await;
    let (a, b, c) = (
        TestUser::new("ga"),
        TestUser::new("gb"),
        TestUser::new("gc"),
    );
    let (mut ca, _) = a.register(relay.url()).await;
    let (mut cb, _) = b.register(relay.url()).await;
    // c is registered but not connected.
    let (cc, _) = c.register(relay.url()).await;
    drop(cc);
    // The relay notices the close asynchronously; wait until c is reported offline.
    let deadline = tokio::time::Instant::now() + syncra_test_support::DEADLINE;
    loop {
        let out = ca.send_envelope(1, a.seal(&[&c], b"x")).await;
        if out[0].outcome == Outcome::Offline {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "c never went offline"
        );
        tokio::task::yield_now().await;
    }
    let group = a.seal(&[&b, &c], b"to the group");
    let outcomes = ca.send_envelope(2, group).await;
    assert_eq!(outcomes.len(), 2);
    assert_eq!(outcomes[0].user_id, b.id());
    assert_eq!(outcomes[0].outcome, Outcome::Delivered);
    assert_eq!(outcomes[1].user_id, c.id());
    assert_eq!(outcomes[1].outcome, Outcome::Offline);
    assert_eq!(b.open(&cb.delivery().await), b"to the group");
}

#[tokio::test]
async fn every_session_of_a_user_receives() {
    let relay = TestRelay::start(|_| {}).await;
    let (a, b) = (TestUser::new("ma"), TestUser::new("mb"));
    let (mut ca, _) = a.register(relay.url()).await;
    let (mut b1, token) = b.register(relay.url()).await;
    let mut b2 = b.login(relay.url()).await;
    let mut b3 = RawClient::connect(relay.url()).await;
    b3.send(&Frame::Resume { token }).await;
    expect_auth_ok(&mut b3, b.id()).await;
    let out = ca.send_envelope(1, a.seal(&[&b], b"all of you")).await;
    assert_eq!(out[0].outcome, Outcome::Delivered);
    for c in [&mut b1, &mut b2, &mut b3] {
        assert_eq!(b.open(&c.delivery().await), b"all of you");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_and_delivered_in_order() {
    let relay = TestRelay::start(|_| {}).await;
    let (a, b) = (TestUser::new("qa"), TestUser::new("qb"));
    let (mut ca, _) = a.register(relay.url()).await;
    let (mut cb, _) = b.register(relay.url()).await;
    // Sends interleaved with store lookups (which wait on the store) and pings, none awaited.
    let mut expected = Vec::new();
    for i in 0..60u32 {
        ca.send(&Frame::Send {
            request_id: i,
            envelope: a.seal(&[&b], format!("m{i:02}").as_bytes()).into(),
        })
        .await;
        expected.push(("send", i));
        if i % 7 == 3 {
            ca.send(&Frame::LookupHandle {
                request_id: 1_000 + i,
                handle: b.handle.clone(),
            })
            .await;
            expected.push(("record", 1_000 + i));
        }
        if i % 11 == 5 {
            ca.send(&Frame::Ping { nonce: i.into() }).await;
            expected.push(("pong", i));
        }
    }
    for (kind, id) in expected {
        let got = match ca.reply().await {
            Frame::SendResult {
                request_id,
                outcomes,
                ..
            } => {
                assert_eq!(outcomes[0].outcome, Outcome::Delivered);
                ("send", request_id)
            }
            Frame::Record { request_id, record } => {
                assert_eq!(record.user_id, b.id());
                ("record", request_id)
            }
            Frame::Pong { nonce } => ("pong", u32::try_from(nonce).unwrap()),
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(got, (kind, id), "answers leave in request order");
    }
    for i in 0..60u32 {
        assert_eq!(
            b.open(&cb.delivery().await),
            format!("m{i:02}").as_bytes(),
            "deliveries in send order"
        );
    }
}

#[tokio::test]
async fn lookups_and_prekey_rotation() {
    let relay = TestRelay::start(|_| {}).await;
    let mut a = TestUser::new("rot");
    let (mut c, _) = a.register(relay.url()).await;
    c.send(&Frame::LookupId {
        request_id: 3,
        user_id: a.id(),
    })
    .await;
    assert!(matches!(
        c.reply().await,
        Frame::Record { request_id: 3, .. }
    ));

    let newer = PrekeySecret::generate(&a.identity, syncra_core::now_ms() / 1000 + 10);
    c.send(&Frame::RotatePrekey {
        request_id: 4,
        prekey: newer.signed().clone(),
    })
    .await;
    assert_eq!(c.reply().await, Frame::Ack { request_id: 4 });
    a.ring.rotate(newer, syncra_core::now_ms() / 1000);
    c.send(&Frame::LookupHandle {
        request_id: 5,
        handle: a.handle.clone(),
    })
    .await;
    match c.reply().await {
        Frame::Record { record, .. } => assert_eq!(record.prekey, *a.ring.current().signed()),
        other => panic!("{other:?}"),
    }

    // Going back to an older prekey, or one signed by someone else, is refused.
    let older = PrekeySecret::generate(&a.identity, 1);
    c.send(&Frame::RotatePrekey {
        request_id: 6,
        prekey: older.signed().clone(),
    })
    .await;
    c.expect_error(ErrorCode::BadPrekey).await;
    let mallory = TestUser::new("mal");
    let foreign = PrekeySecret::generate(&mallory.identity, syncra_core::now_ms() / 1000 + 20);
    c.send(&Frame::RotatePrekey {
        request_id: 7,
        prekey: foreign.signed().clone(),
    })
    .await;
    c.expect_error(ErrorCode::BadPrekey).await;
    // A prekey dated far in the future would block every later rotation.
    let future = PrekeySecret::generate(&a.identity, syncra_core::now_ms() / 1000 + 10 * 86400);
    c.send(&Frame::RotatePrekey {
        request_id: 8,
        prekey: future.signed().clone(),
    })
    .await;
    c.expect_error(ErrorCode::BadPrekey).await;

    c.send(&Frame::LookupHandle {
        request_id: 10,
        handle: "nobody_here".into(),
    })
    .await;
    c.expect_error(ErrorCode::NotFound).await;
    c.send(&Frame::LookupHandle {
        request_id: 11,
        handle: "no".into(),
    })
    .await;
    c.expect_error(ErrorCode::HandleInvalid).await;
}

#[tokio::test]
async fn garbage_truncated_and_unknown_version_frames_get_their_codes() {
    let relay = TestRelay::start(|_| {}).await;
    let mut c = RawClient::connect(relay.url()).await;
    c.send_bytes(Bytes::from_static(b"\xde\xad\xbe\xef garbage"))
        .await;
    c.expect_error(ErrorCode::UnsupportedVersion).await;
    c.send_bytes(vec![PROTOCOL_VERSION, 0x7e]).await;
    c.expect_error(ErrorCode::Malformed).await;
    let mut truncated = Frame::Ping { nonce: 1 }.encode().to_vec();
    truncated.truncate(5);
    c.send_bytes(truncated).await;
    c.expect_error(ErrorCode::Malformed).await;
    // The connection still works after bad frames.
    c.send(&Frame::Ping { nonce: 42 }).await;
    assert_eq!(c.reply().await, Frame::Pong { nonce: 42 });

    // The same after login, and a malformed envelope inside a valid frame.
    let u = TestUser::new("garb");
    let (mut c, _) = u.register(relay.url()).await;
    c.send_bytes(vec![PROTOCOL_VERSION]).await;
    c.expect_error(ErrorCode::Malformed).await;
    c.send(&Frame::Send {
        request_id: 77,
        envelope: Bytes::from_static(b"\x01not an envelope"),
    })
    .await;
    c.expect_error(ErrorCode::BadEnvelope).await;
    still_serving(&relay).await;
}

#[tokio::test]
async fn oversized_frames_close_the_connection_with_frame_too_large() {
    let relay = TestRelay::start(|c| c.limits.max_frame = 4096).await;
    let mut c = RawClient::connect(relay.url()).await;
    c.send_bytes(vec![PROTOCOL_VERSION; 10_000]).await;
    c.expect_close(ErrorCode::FrameTooLarge).await;
    still_serving(&relay).await;
}

/// A WebSocket connection to the relay by hand: the upgrade, then raw bytes.
async fn raw_websocket(relay: &TestRelay) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = relay
        .url()
        .trim_start_matches("ws://")
        .trim_end_matches('/');
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        socket.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    socket
}

/// Reads what the relay writes until its close frame; returns the close code.
async fn close_code(socket: &mut tokio::net::TcpStream) -> u16 {
    use syncra_transport_ws::frames::{Decoder, Parsed, Role};
    use tokio::io::AsyncReadExt;
    let mut decoder = Decoder::new(Role::Client, 1 << 20);
    let mut buf = bytes::BytesMut::new();
    loop {
        match decoder.decode(&mut buf).unwrap() {
            Some(Parsed::Close(Some((code, _)))) => return code,
            Some(Parsed::Close(None)) => panic!("closed without a code"),
            Some(_) => continue,
            None => {}
        }
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            socket.read_buf(&mut buf),
        )
        .await
        .expect("the relay answers in time")
        .unwrap();
        assert!(read > 0, "the relay hung up without a close frame");
    }
}

#[tokio::test]
async fn a_connection_breaking_websocket_framing_is_closed_as_malformed() {
    use tokio::io::AsyncWriteExt;
    let relay = TestRelay::start(|_| {}).await;
    // A client's frame must be masked; this one is not (a binary frame of one byte).
    let mut socket = raw_websocket(&relay).await;
    socket.write_all(&[0x82, 0x01, 0x01]).await.unwrap();
    assert_eq!(
        close_code(&mut socket).await,
        4000 + ErrorCode::Malformed.as_u16()
    );
    // Reserved bits set, with no extension agreed.
    let mut socket = raw_websocket(&relay).await;
    socket
        .write_all(&[0xC2, 0x81, 1, 2, 3, 4, 0x01])
        .await
        .unwrap();
    assert_eq!(
        close_code(&mut socket).await,
        4000 + ErrorCode::Malformed.as_u16()
    );
    still_serving(&relay).await;
}

#[tokio::test]
async fn requests_before_authentication_are_refused() {
    let relay = TestRelay::start(|_| {}).await;
    let (a, b) = (TestUser::new("early_a"), TestUser::new("early_b"));
    b.register(relay.url()).await;
    let mut c = RawClient::connect(relay.url()).await;
    c.send(&Frame::Send {
        request_id: 5,
        envelope: a.seal(&[&b], b"too early").into(),
    })
    .await;
    let message = c.expect_error(ErrorCode::NotAuthenticated).await;
    assert!(message.contains("log in"), "{message}"); // Handle lookups are allowed before login (onboarding checks whether a handle is free).
    c.send(&Frame::LookupHandle {
        request_id: 6,
        handle: b.handle.clone(),
    })
    .await;
    assert!(matches!(
        c.reply().await,
        Frame::Record { request_id: 6, .. }
    ));
    c.send(&Frame::LookupId {
        request_id: 7,
        user_id: b.id(),
    })
    .await;
    c.expect_error(ErrorCode::NotAuthenticated).await;
    // Frames only a relay sends are "unexpected".
    c.send(&Frame::Ack { request_id: 1 }).await;
    c.expect_error(ErrorCode::Unexpected).await;
    still_serving(&relay).await;
}

#[tokio::test]
async fn bad_proofs_replays_and_forged_tokens_are_refused() {
    let relay = TestRelay::start(|c| c.auth.max_attempts_per_connection = 10).await;
    let user = TestUser::new("victim");
    user.register(relay.url()).await;
    let mallory = TestUser::new("mallory");

    // A login signed by the wrong key.
    let mut c = RawClient::connect(relay.url()).await;
    let mut forged = mallory.auth_frame(&c);
    if let Frame::Auth { user_id, .. } = &mut forged {
        *user_id = user.id();
    }
    c.send(&forged).await;
    c.expect_error(ErrorCode::AuthFailed).await;
    c.expect_challenge().await;

    // A valid login response replayed: on the same connection after the nonce was used, and on
    // a new connection with a different nonce.
    let mut first = RawClient::connect(relay.url()).await;
    let proof = user.auth_frame(&first);
    first.send(&proof).await;
    expect_auth_ok(&mut first, user.id()).await;
    first.send(&proof).await;
    first.expect_error(ErrorCode::AlreadyAuthenticated).await;
    let mut other = RawClient::connect(relay.url()).await;
    other.send(&proof).await;
    other.expect_error(ErrorCode::AuthFailed).await;

    // A failed attempt consumes the nonce: replaying the proof for the old nonce fails even
    // though it was signed correctly for it.
    let mut c2 = RawClient::connect(relay.url()).await;
    let stale = user.auth_frame(&c2);
    c2.send(&mallory.auth_frame(&c2)).await;
    c2.expect_error(ErrorCode::NotFound).await;
    c2.expect_challenge().await;
    c2.send(&stale).await;
    c2.expect_error(ErrorCode::AuthFailed).await;

    // Registration proofs are checked too.
    let mut c3 = RawClient::connect(relay.url()).await;
    let mut reg = mallory.register_frame(&c3);
    if let Frame::Register { signature, .. } = &mut reg {
        signature[0] ^= 1;
    }
    c3.send(&reg).await;
    c3.expect_error(ErrorCode::AuthFailed).await;

    // Forged and garbage tokens.
    let mut c4 = RawClient::connect(relay.url()).await;
    c4.send(&Frame::Resume {
        token: "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2ln".into(),
    })
    .await;
    c4.expect_error(ErrorCode::TokenInvalid).await;
    c4.expect_challenge().await;
    let other_relay = TestRelay::start(|c| c.relay_id = "someone-else".into()).await;
    let (_, foreign_token) = TestUser::new("foreign").register(other_relay.url()).await;
    c4.send(&Frame::Resume {
        token: foreign_token,
    })
    .await;
    c4.expect_error(ErrorCode::TokenInvalid).await;
    still_serving(&relay).await;
}

#[tokio::test]
async fn expired_tokens_are_refused_with_their_own_code() {
    let relay = TestRelay::start(|c| c.auth.token_ttl_secs = 0).await;
    let user = TestUser::new("expiry");
    let (_, token) = user.register(relay.url()).await;
    let mut c = RawClient::connect(relay.url()).await;
    c.send(&Frame::Resume { token }).await;
    c.expect_error(ErrorCode::TokenExpired).await;
}

#[tokio::test]
async fn too_many_failed_logins_close_the_connection() {
    let relay = TestRelay::start(|c| c.auth.max_attempts_per_connection = 2).await;
    let u = TestUser::new("nobody");
    let mut c = RawClient::connect(relay.url()).await;
    let f = u.auth_frame(&c);
    c.send(&f).await;
    c.expect_error(ErrorCode::NotFound).await;
    c.expect_challenge().await;
    let f = u.auth_frame(&c);
    c.send(&f).await;
    c.expect_close(ErrorCode::NotFound).await;
    still_serving(&relay).await;
}

#[tokio::test]
async fn taken_and_invalid_handles_are_refused() {
    let relay = TestRelay::start(|_| {}).await;
    let first = TestUser::new("taken");
    first.register(relay.url()).await;
    let mut second = TestUser::new("x");
    second.handle = first.handle.clone();
    let mut c = RawClient::connect(relay.url()).await;
    let f = second.register_frame(&c);
    c.send(&f).await;
    let message = c.expect_error(ErrorCode::HandleTaken).await;
    assert!(message.contains("taken"), "{message}");
    c.expect_challenge().await;

    for bad in ["ab", "1abc", "admin", "has space", "ümlaut"] {
        let mut u = TestUser::new("x");
        u.handle = bad.into();
        let mut c = RawClient::connect(relay.url()).await;
        let f = u.register_frame(&c);
        c.send(&f).await;
        c.expect_error(ErrorCode::HandleInvalid).await;
    }

    // The same identity cannot take a second handle.
    let mut again = TestUser::new("y");
    again.identity = first.identity.clone();
    again.ring = PrekeyRing::new(PrekeySecret::generate(
        &again.identity,
        syncra_core::now_ms() / 1000,
    ));
    let mut c = RawClient::connect(relay.url()).await;
    let f = again.register_frame(&c);
    c.send(&f).await;
    c.expect_error(ErrorCode::AlreadyRegistered).await;
    still_serving(&relay).await;
}

#[tokio::test]
async fn a_flood_from_one_address_hits_the_rate_limit() {
    let relay = TestRelay::start(|c| {
        c.limits.messages_per_second_per_user = 5;
        c.limits.message_burst_per_user = 5;
    })
    .await;
    let (a, b) = (TestUser::new("flood_a"), TestUser::new("flood_b"));
    let (mut ca, _) = a.register(relay.url()).await;
    let (_cb, _) = b.register(relay.url()).await;
    let mut limited = false;
    for i in 0..50 {
        ca.send(&Frame::Send {
            request_id: i,
            envelope: a.seal(&[&b], b"spam").into(),
        })
        .await;
    }
    for _ in 0..50 {
        match ca.reply().await {
            Frame::SendResult { .. } => {}
            Frame::Error {
                code: ErrorCode::RateLimited,
                ..
            } => limited = true,
            other => panic!("{other:?}"),
        }
    }
    assert!(limited, "50 sends at once must exceed a burst of 5");

    // Authentication attempts per address are limited too.
    let relay2 = TestRelay::start(|c| {
        c.auth.attempts_per_minute_per_address = 3;
        c.auth.max_attempts_per_connection = 100;
    })
    .await;
    let nobody = TestUser::new("nobody");
    let mut c = RawClient::connect(relay2.url()).await;
    let mut codes = Vec::new();
    for _ in 0..5 {
        let f = nobody.auth_frame(&c);
        c.send(&f).await;
        match c.reply().await {
            Frame::Error { code, .. } => codes.push(code),
            other => panic!("{other:?}"),
        }
        c.expect_challenge().await;
    }
    assert_eq!(&codes[..3], &[ErrorCode::NotFound; 3]);
    assert_eq!(&codes[3..], &[ErrorCode::RateLimited; 2]);
    still_serving(&relay).await;
}

#[tokio::test]
async fn connections_per_address_are_limited() {
    let relay = TestRelay::start(|c| c.limits.connections_per_address = 2).await;
    let _a = RawClient::connect(relay.url()).await;
    let _b = RawClient::connect(relay.url()).await;
    let transport =
        syncra_transport_ws::WsTransport::new(syncra_transport_ws::WsConfig::default()).unwrap();
    use syncra_core::transport::Transport;
    let mut third = transport.connect(relay.url()).await.unwrap();
    assert!(third.stream.recv().await.is_none());
    assert_eq!(
        third.stream.close_reason().unwrap().code,
        Some(ErrorCode::TooManyConnections)
    );
}

#[tokio::test]
async fn a_slow_consumer_is_refused_and_told_without_slowing_others() {
    let relay = TestRelay::start(|c| {
        c.limits.queue_capacity = 4;
        c.limits.messages_per_second_per_user = 10_000;
        c.limits.message_burst_per_user = 10_000;
    })
    .await;
    let (a, slow, fast) = (
        TestUser::new("prod"),
        TestUser::new("slow"),
        TestUser::new("fast"),
    );
    let (mut ca, _) = a.register(relay.url()).await;
    let (mut cslow, _) = slow.register(relay.url()).await;
    let (mut cfast, _) = fast.register(relay.url()).await;
    // The slow client does not read. Large messages fill its socket buffers, then its queue.
    let big = vec![7u8; 200_000];
    let mut rejected = 0;
    for i in 0..200 {
        let out = ca.send_envelope(i, a.seal(&[&slow], &big)).await;
        if out[0].outcome == Outcome::Rejected(ErrorCode::QueueOverflow) {
            rejected += 1;
            if rejected >= 3 {
                break;
            }
        }
    }
    assert!(rejected >= 3, "the slow consumer's queue never overflowed");
    // Meanwhile the fast client is served at once.
    let out = ca.send_envelope(999, a.seal(&[&fast], b"hi")).await;
    assert_eq!(out[0].outcome, Outcome::Delivered);
    assert_eq!(fast.open(&cfast.delivery().await), b"hi");
    // The slow client, once it reads, is told it missed messages.
    let mut told = false;
    while !told {
        match cslow.frame().await {
            Frame::Error {
                code: ErrorCode::QueueOverflow,
                ..
            } => told = true,
            Frame::Deliver { .. } | Frame::PendingEnd { .. } => {}
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn idle_sessions_are_closed_with_timeout() {
    let relay = TestRelay::start(|c| c.limits.idle_timeout_secs = 1).await;
    let u = TestUser::new("idle");
    let (mut c, _) = u.register(relay.url()).await;
    c.expect_close(ErrorCode::Timeout).await;
}

#[tokio::test]
async fn a_session_that_pings_outlives_the_idle_timeout_while_a_quiet_one_is_closed() {
    let relay = TestRelay::start(|c| c.limits.idle_timeout_secs = 2).await;
    let (mut chatty, _) = TestUser::new("chatty").register(relay.url()).await;
    let (mut quiet, _) = TestUser::new("quiet").register(relay.url()).await;
    // Three times the timeout, a ping every eighth of it.
    for nonce in 0..24u64 {
        chatty.send(&Frame::Ping { nonce }).await;
        assert_eq!(chatty.reply().await, Frame::Pong { nonce });
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    quiet.expect_close(ErrorCode::Timeout).await;
    chatty.send(&Frame::Ping { nonce: 99 }).await;
    assert_eq!(chatty.reply().await, Frame::Pong { nonce: 99 });
}

#[tokio::test]
async fn health_and_metrics_are_served() {
    let relay = TestRelay::start(|_| {}).await;
    still_serving(&relay).await;
    let (status, body) = relay.admin_get("/healthz").await;
    assert_eq!(status, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["broker"]["status"], "up");
    assert_eq!(health["store"]["status"], "up");
    let (status, metrics) = relay.admin_get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("syncra_relay_send_outcomes_total{outcome=\"delivered\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("syncra_relay_sessions"), "{metrics}");
}

#[tokio::test]
async fn shutdown_drains_sessions_with_a_reason() {
    let relay = TestRelay::start(|_| {}).await;
    let u = TestUser::new("drain");
    let (mut c, _) = u.register(relay.url()).await;
    let TestRelay { relay, dir } = relay;
    let stop = tokio::spawn(relay.shutdown());
    c.expect_close(ErrorCode::ShuttingDown).await;
    stop.await.unwrap().unwrap();
    drop(dir);
}

#[tokio::test]
async fn plaintext_on_a_public_address_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = syncra_test_relay::test_relay_config(dir.path().join("d"));
    config.listen = "0.0.0.0:0".into();
    let err = syncra_relay::Relay::start(config).await.unwrap_err();
    assert!(format!("{err:#}").contains("behind_tls_proxy"), "{err:#}");
}

#[tokio::test]
async fn unknown_and_uncompiled_plugin_kinds_are_different_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = syncra_test_relay::test_relay_config(dir.path().join("d"));
    config.broker = serde_json::json!({ "kind": "natz" });
    let err = format!(
        "{:#}",
        syncra_relay::Relay::start(config.clone())
            .await
            .unwrap_err()
    );
    assert!(err.contains("unknown broker kind \"natz\""), "{err}");
    // A build without the NATS broker (here: a registry without it) says how to get it.
    config.broker = serde_json::json!({ "kind": "nats" });
    let mut slim = syncra_core::registry::PluginRegistry::new(syncra_relay::kinds::KNOWN);
    syncra_transport_ws::register(&mut slim.transports).unwrap();
    syncra_broker_memory::register(&mut slim.brokers).unwrap();
    syncra_store_sqlite::register(&mut slim.stores).unwrap();
    syncra_store_sqlite::mailbox::register(&mut slim.mailboxes).unwrap();
    let err = format!(
        "{:#}",
        syncra_relay::Relay::start_with(config, slim)
            .await
            .unwrap_err()
    );
    assert!(err.contains("not compiled into this build"), "{err}");
    assert!(err.contains("broker-nats"), "{err}");
}

#[tokio::test]
async fn the_relay_keeps_serving_after_a_client_vanishes_mid_frame() {
    let relay = TestRelay::start(|_| {}).await;
    let c = RawClient::connect(relay.url()).await;
    drop(c);
    let mut c = RawClient::connect(relay.url()).await;
    c.send(&Frame::Ping { nonce: 1 }).await;
    match c.recv().await {
        Received::Frame(Frame::Pong { nonce: 1 }) => {}
        other => panic!("{other:?}"),
    }
    still_serving(&relay).await;
}

/// A busy port is the first thing that happens on a shared machine: the error names the
/// setting to change, for the client port and for the admin port.
#[tokio::test]
async fn a_busy_port_names_the_setting_to_change() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let mut config = syncra_test_relay::test_relay_config(dir.path().join("data"));
    config.listen = busy.clone();
    let err = format!(
        "{:#}",
        syncra_relay::Relay::start(config).await.unwrap_err()
    );
    assert!(
        err.contains(&busy) && err.contains("SYNCRA_LISTEN"),
        "{err}"
    );

    let mut config = syncra_test_relay::test_relay_config(dir.path().join("data"));
    config.admin_listen = busy.clone();
    let err = format!(
        "{:#}",
        syncra_relay::Relay::start(config).await.unwrap_err()
    );
    assert!(err.contains("SYNCRA_ADMIN_LISTEN"), "{err}");
}

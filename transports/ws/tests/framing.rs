//! The transport's own WebSocket framing against an independent implementation (tungstenite, as
//! peer on the other end of a real socket) and against raw bytes a hostile peer writes: frames
//! both ways, pings answered, close codes echoed, a first frame sent in the same packet as the
//! handshake, and protocol violations refused without disturbing other connections.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use syncra_core::error::TransportError;
use syncra_core::transport::{CloseReason, Connection, Listener, Transport};
use syncra_core::wire::ErrorCode;
use syncra_transport_ws::{WsConfig, WsTransport, frames};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const DEADLINE: Duration = Duration::from_secs(10);

/// A listener with a 4 KiB frame limit, its URL and its port.
async fn listener() -> (Box<dyn Listener>, String, u16) {
    let t = WsTransport::new(WsConfig {
        max_frame: 4096,
        ..WsConfig::default()
    })
    .unwrap();
    let listener = t.bind("127.0.0.1:0").await.unwrap();
    let url = listener.url();
    let port = listener.local_addr().port();
    (listener, url, port)
}

async fn accepted(listener: &mut Box<dyn Listener>) -> Connection {
    let incoming = tokio::time::timeout(DEADLINE, listener.accept())
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(DEADLINE, incoming.handshake)
        .await
        .unwrap()
        .unwrap()
}

async fn recv(conn: &mut Connection) -> Option<Result<Bytes, TransportError>> {
    tokio::time::timeout(DEADLINE, conn.stream.recv())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_tungstenite_client_and_our_server_exchange_frames_pings_and_close_codes() {
    let (mut listener, url, _) = listener().await;
    let client = tokio::spawn(async move { tokio_tungstenite::connect_async(url).await.unwrap() });
    let mut server = accepted(&mut listener).await;
    let (mut ws, _) = client.await.unwrap();

    // Sizes in each length class; tungstenite masks them, ours unmasks.
    for len in [0usize, 5, 125, 126, 300, 4096] {
        let payload: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        ws.send(Message::binary(payload.clone())).await.unwrap();
        assert_eq!(recv(&mut server).await.unwrap().unwrap(), payload);
    }
    // Our frames, unmasked, read by tungstenite; several in one write.
    server
        .sink
        .send(&[Bytes::from_static(b"one"), Bytes::from(vec![9u8; 70_000])])
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(&b"one"[..])
    );
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(vec![9u8; 70_000])
    );
    // A ping is answered with its payload, while the server waits for a frame.
    ws.send(Message::Ping(Bytes::from_static(b"are you there")))
        .await
        .unwrap();
    let waiting = tokio::time::timeout(Duration::from_millis(300), server.stream.recv()).await;
    assert!(waiting.is_err(), "a ping is not a frame");
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Pong(Bytes::from_static(b"are you there"))
    );
    // A text message is refused by name, and the connection goes on.
    ws.send(Message::text("hello")).await.unwrap();
    let got = recv(&mut server).await.unwrap();
    assert!(
        matches!(&got, Err(TransportError::Other(m)) if m.contains("text messages")),
        "{got:?}"
    );
    ws.send(Message::binary(&b"after"[..])).await.unwrap();
    assert_eq!(recv(&mut server).await.unwrap().unwrap(), "after");
    // The client closes with a code: the server reports it and echoes the close.
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4000 + ErrorCode::RateLimited.as_u16()),
        reason: "enough".into(),
    }))
    .await
    .unwrap();
    assert!(recv(&mut server).await.is_none());
    let reason = server.stream.close_reason().unwrap();
    assert_eq!(reason.code, Some(ErrorCode::RateLimited));
    assert_eq!(reason.message, "enough");
    match ws.next().await {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(
                u16::from(frame.code),
                4000 + ErrorCode::RateLimited.as_u16()
            );
        }
        other => panic!("expected the close echoed, got {other:?}"),
    }
}

#[tokio::test]
async fn our_client_and_a_tungstenite_server_exchange_frames_and_close_reasons() {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", tcp.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let (socket, _) = tcp.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(socket).await.unwrap();
        // The first frame goes out right behind the handshake's response, as the relay's
        // challenge does.
        ws.send(Message::binary(&b"challenge"[..])).await.unwrap();
        let got = ws.next().await.unwrap().unwrap();
        ws.send(got).await.unwrap();
        ws.close(Some(CloseFrame {
            code: CloseCode::from(4000 + ErrorCode::ShuttingDown.as_u16()),
            reason: "restarting".into(),
        }))
        .await
        .unwrap();
        // Drain until the client's echo arrives.
        while let Some(Ok(m)) = ws.next().await {
            if m.is_close() {
                break;
            }
        }
    });
    let t = WsTransport::new(WsConfig::default()).unwrap();
    let mut client = t.connect(&url).await.unwrap();
    assert_eq!(recv(&mut client).await.unwrap().unwrap(), "challenge");
    let big = Bytes::from(vec![7u8; 20_000]);
    client.sink.send(std::slice::from_ref(&big)).await.unwrap();
    assert_eq!(recv(&mut client).await.unwrap().unwrap(), big);
    assert!(recv(&mut client).await.is_none());
    let reason = client.stream.close_reason().unwrap();
    assert_eq!(reason.code, Some(ErrorCode::ShuttingDown));
    assert_eq!(reason.message, "restarting");
    tokio::time::timeout(DEADLINE, server)
        .await
        .unwrap()
        .unwrap();
}

/// A client's handshake request by hand, the key from RFC 6455 §1.3.
fn upgrade_request(port: u16) -> String {
    format!(
        "GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// A masked client frame whose first byte (FIN, reserved bits, opcode) is `first`, as given.
fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    frames::encode(&mut out, first & 0x0F, payload, Some([1, 2, 3, 4]));
    out[0] = first;
    out.to_vec()
}

async fn read_response_head(socket: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        socket.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

#[tokio::test]
async fn a_first_frame_in_the_same_packet_as_the_handshake_is_not_lost() {
    let (mut listener, _, port) = listener().await;
    let mut socket = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    // Handshake, a fragmented message and a whole one, in one write.
    let mut packet = upgrade_request(port).into_bytes();
    packet.extend(masked(0x02, b"frag")); // binary, not final
    packet.extend(masked(0x80, b"mented")); // continuation, final
    packet.extend(masked(0x82, b"whole"));
    socket.write_all(&packet).await.unwrap();
    let mut server = accepted(&mut listener).await;
    let head = read_response_head(&mut socket).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    assert_eq!(recv(&mut server).await.unwrap().unwrap(), "fragmented");
    assert_eq!(recv(&mut server).await.unwrap().unwrap(), "whole");
}

#[tokio::test]
async fn a_peer_breaking_the_framing_rules_is_refused_and_others_go_on() {
    let (mut listener, url, port) = listener().await;
    let cases: [(&str, Vec<u8>); 4] = [
        ("was not masked", vec![0x82, 0x01, b'x']),
        ("reserved bits", {
            let mut f = masked(0x82, b"x");
            f[0] |= 0x40;
            f
        }),
        ("unknown opcode", masked(0x83, b"x")),
        ("fragmented control frame", masked(0x09, b"x")),
    ];
    // A well-behaved connection held open throughout.
    let good_url = url.clone();
    let good = tokio::spawn(async move { tokio_tungstenite::connect_async(good_url).await });
    let mut good_server = accepted(&mut listener).await;
    let (mut good_ws, _) = good.await.unwrap().unwrap();
    for (why, frame) in cases {
        let mut socket = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        socket
            .write_all(upgrade_request(port).as_bytes())
            .await
            .unwrap();
        let mut server = accepted(&mut listener).await;
        read_response_head(&mut socket).await;
        socket.write_all(&frame).await.unwrap();
        let got = recv(&mut server).await;
        assert!(
            matches!(&got, Some(Err(TransportError::Protocol(m))) if m.contains(why)),
            "{why}: {got:?}"
        );
        // Nothing more is read from a connection that broke the rules.
        socket.write_all(&masked(0x82, b"more")).await.unwrap();
        assert!(recv(&mut server).await.is_none(), "{why}");
        server
            .sink
            .close(CloseReason::error(ErrorCode::Malformed, "bad framing"))
            .await
            .unwrap();
        // The good connection is untouched.
        good_ws.send(Message::binary(why.as_bytes())).await.unwrap();
        assert_eq!(recv(&mut good_server).await.unwrap().unwrap(), why);
    }
    // A frame announcing more than the limit is refused from its header, before its payload.
    let mut socket = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    socket
        .write_all(upgrade_request(port).as_bytes())
        .await
        .unwrap();
    let mut server = accepted(&mut listener).await;
    read_response_head(&mut socket).await;
    socket
        .write_all(&[0x82, 0xFF, 0, 0, 0, 1, 0, 0, 0, 0, 1, 2, 3, 4])
        .await
        .unwrap();
    let got = recv(&mut server).await;
    assert!(
        matches!(
            got,
            Some(Err(TransportError::TooLarge {
                size: 4_294_967_296,
                max: 4096
            }))
        ),
        "{got:?}"
    );
}

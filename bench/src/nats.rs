//! A minimal NATS client over WebSocket: the reference peer for the relay benchmarks.
//!
//! Only what plain publish/subscribe needs: `INFO`, `CONNECT`, `PING`/`PONG`, `SUB`, `PUB`,
//! `MSG`, `+OK` and `-ERR` of the NATS text protocol, carried in WebSocket binary messages
//! (nats-server's `websocket` listener). Written by hand rather than taken from async-nats so
//! that both systems are driven through the same WebSocket stack (`crate::ws`) and the
//! workspace's async-nats stays built without its websocket feature.
//!
//! Each `PUB` goes out as one WebSocket message, as each Syncra `Send` does. Incoming WebSocket
//! messages may hold several protocol messages or part of one; the parser buffers across them.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::ws::{self, Ws};

/// Longest protocol line accepted (INFO can be a few KiB).
const MAX_LINE: usize = 64 * 1024;
/// Largest payload accepted.
const MAX_PAYLOAD: usize = 64 * 1024 * 1024;
/// How long the server may take to answer during setup.
const SETUP_TIMEOUT: Duration = Duration::from_secs(15);

/// One protocol message from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A delivered message: subscription id and payload.
    Msg {
        /// The subscription id it was delivered for.
        sid: u64,
        /// The payload.
        payload: Bytes,
    },
    /// The server pings; answer with `PONG`.
    Ping,
    /// The answer to our `PING`.
    Pong,
    /// Server information (at connect, and again on cluster changes).
    Info,
    /// `+OK` (only in verbose mode).
    Ok,
    /// `-ERR` with the server's text.
    Err(String),
}

/// Incremental parser of the server-to-client protocol.
#[derive(Debug, Default)]
pub struct Parser {
    buf: BytesMut,
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

impl Parser {
    /// Adds bytes read from the connection.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete message, if the buffer holds one.
    pub fn next_event(&mut self) -> anyhow::Result<Option<Event>> {
        let Some(eol) = find_crlf(&self.buf) else {
            if self.buf.len() > MAX_LINE {
                bail!("protocol line longer than {MAX_LINE} bytes");
            }
            return Ok(None);
        };
        let line = std::str::from_utf8(&self.buf[..eol]).context("protocol line not UTF-8")?;
        let mut words = line.split_ascii_whitespace();
        let op = words.next().unwrap_or("").to_ascii_uppercase();
        let event = match op.as_str() {
            "MSG" => {
                // MSG <subject> <sid> [reply-to] <#bytes>
                let args: Vec<&str> = words.collect();
                if args.len() < 3 || args.len() > 4 {
                    bail!("bad MSG line: {line}");
                }
                let sid: u64 = args[1].parse().context("bad MSG sid")?;
                let size: usize = args[args.len() - 1].parse().context("bad MSG size")?;
                if size > MAX_PAYLOAD {
                    bail!("MSG payload of {size} bytes is over the limit");
                }
                if self.buf.len() < eol + 2 + size + 2 {
                    return Ok(None);
                }
                self.buf.advance(eol + 2);
                let payload = self.buf.split_to(size).freeze();
                if &self.buf[..2] != b"\r\n" {
                    bail!("MSG payload not followed by CRLF");
                }
                self.buf.advance(2);
                return Ok(Some(Event::Msg { sid, payload }));
            }
            "PING" => Event::Ping,
            "PONG" => Event::Pong,
            "INFO" => Event::Info,
            "+OK" => Event::Ok,
            "-ERR" => Event::Err(line[4..].trim().to_owned()),
            _ => bail!("unknown protocol message: {line}"),
        };
        self.buf.advance(eol + 2);
        Ok(Some(event))
    }
}

/// The bytes of one `PUB`.
pub fn pub_bytes(subject: &str, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(subject.len() + payload.len() + 24);
    out.put_slice(b"PUB ");
    out.put_slice(subject.as_bytes());
    out.put_slice(format!(" {}\r\n", payload.len()).as_bytes());
    out.put_slice(payload);
    out.put_slice(b"\r\n");
    out.freeze()
}

/// A connection to nats-server's WebSocket listener.
pub struct NatsConn {
    /// The WebSocket.
    pub ws: Ws,
    /// Bytes received and not yet parsed.
    pub parser: Parser,
}

/// Reads the next event from a WebSocket stream through a parser; `None` when closed.
pub async fn read_event<S>(stream: &mut S, parser: &mut Parser) -> anyhow::Result<Option<Event>>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        if let Some(e) = parser.next_event()? {
            return Ok(Some(e));
        }
        match stream.next().await {
            None => return Ok(None),
            Some(Err(e)) => bail!("nats connection failed: {e}"),
            Some(Ok(Message::Binary(b))) => parser.push(&b),
            Some(Ok(Message::Text(t))) => parser.push(t.as_bytes()),
            Some(Ok(Message::Close(_))) => return Ok(None),
            Some(Ok(_)) => continue,
        }
    }
}

impl NatsConn {
    /// Connects, reads `INFO`, sends `CONNECT` and waits for the `PONG` to a `PING`.
    pub async fn connect(url: &str, source: Option<IpAddr>, name: &str) -> anyhow::Result<Self> {
        let ws = ws::connect(url, source).await?;
        let mut conn = NatsConn {
            ws,
            parser: Parser::default(),
        };
        match conn.setup_event().await? {
            Event::Info => {}
            other => bail!("expected INFO from nats-server, got {other:?}"),
        }
        let connect = format!(
            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"tls_required\":false,\
             \"name\":\"{name}\",\"lang\":\"rust\",\"version\":\"0.1.0\",\"protocol\":1,\
             \"echo\":false,\"headers\":false}}\r\n"
        );
        conn.send(Bytes::from(connect)).await?;
        conn.round_trip().await?;
        Ok(conn)
    }

    async fn setup_event(&mut self) -> anyhow::Result<Event> {
        tokio::time::timeout(SETUP_TIMEOUT, read_event(&mut self.ws, &mut self.parser))
            .await
            .context("nats-server did not answer in time")??
            .context("nats-server closed the connection")
    }

    /// Sends bytes as one WebSocket message.
    pub async fn send(&mut self, bytes: Bytes) -> anyhow::Result<()> {
        self.ws
            .send(Message::Binary(bytes))
            .await
            .context("sending to nats-server")
    }

    /// `PING` and wait for `PONG`: everything sent before has been processed by the server.
    pub async fn round_trip(&mut self) -> anyhow::Result<()> {
        self.send(Bytes::from_static(b"PING\r\n")).await?;
        loop {
            match self.setup_event().await? {
                Event::Pong => return Ok(()),
                Event::Ping => self.send(Bytes::from_static(b"PONG\r\n")).await?,
                Event::Err(e) => bail!("nats-server: {e}"),
                Event::Info | Event::Ok => {}
                Event::Msg { .. } => bail!("unexpected MSG during setup"),
            }
        }
    }

    /// Subscribes `subject` under `sid` (call [`NatsConn::round_trip`] to be sure it is live).
    pub async fn subscribe(&mut self, subject: &str, sid: u64) -> anyhow::Result<()> {
        self.send(Bytes::from(format!("SUB {subject} {sid}\r\n")))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_split_and_joined_messages() {
        let mut p = Parser::default();
        p.push(b"INFO {\"x\":1}\r\nPING\r\nMSG a.b 7 5\r\nhel");
        assert_eq!(p.next_event().unwrap(), Some(Event::Info));
        assert_eq!(p.next_event().unwrap(), Some(Event::Ping));
        assert_eq!(p.next_event().unwrap(), None);
        p.push(b"lo\r\nMSG a.b 8 r.x 0\r\n\r\n-ERR 'oops'\r\n");
        assert_eq!(
            p.next_event().unwrap(),
            Some(Event::Msg {
                sid: 7,
                payload: Bytes::from_static(b"hello")
            })
        );
        assert_eq!(
            p.next_event().unwrap(),
            Some(Event::Msg {
                sid: 8,
                payload: Bytes::new()
            })
        );
        assert_eq!(p.next_event().unwrap(), Some(Event::Err("'oops'".into())));
        assert_eq!(p.next_event().unwrap(), None);
    }

    #[test]
    fn refuses_garbage() {
        let mut p = Parser::default();
        p.push(b"WHAT\r\n");
        assert!(p.next_event().is_err());
        let mut p = Parser::default();
        p.push(b"MSG a 1 3\r\nabcXY");
        assert!(p.next_event().is_err());
    }

    #[test]
    fn pub_frames() {
        assert_eq!(&pub_bytes("s.1", b"hi")[..], b"PUB s.1 2\r\nhi\r\n");
    }
}

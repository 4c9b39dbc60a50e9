//! The `Transport` contract: bidirectional connections of binary frames.
//!
//! Why this shape: the relay must accept quickly and do the expensive part of a connection
//! (TLS and WebSocket handshakes) off the accept loop under its own timeout, so `accept` hands
//! back an [`Incoming`] whose handshake is a separate future. An established connection is split
//! into a sink and a stream from the start, because the relay reads and writes each session from
//! different tasks (a reader, and a writer that batches). The sink takes a batch of frames so a
//! transport can write them with one flush. Frames are [`Bytes`] so one encoded frame can be
//! shared by every session it goes to without copying.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::TransportError;
use crate::wire::ErrorCode;

/// Why a connection is being closed; carried in the close frame (code 4000 + error code).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseReason {
    /// The protocol error code, or `None` for a normal close.
    pub code: Option<ErrorCode>,
    /// A short human-readable explanation.
    pub message: String,
}

impl CloseReason {
    /// A normal close.
    pub fn normal(message: impl Into<String>) -> Self {
        CloseReason {
            code: None,
            message: message.into(),
        }
    }

    /// A close because of an error.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        CloseReason {
            code: Some(code),
            message: message.into(),
        }
    }
}

/// Who is on the other end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// The socket address of the peer (a proxy, if there is one in front).
    pub addr: SocketAddr,
    /// The client address a trusted proxy reported, if the transport is configured to trust one.
    pub forwarded_for: Option<std::net::IpAddr>,
}

impl PeerInfo {
    /// The address limits should apply to: the forwarded client address when a trusted proxy
    /// gave one, otherwise the socket peer.
    pub fn client_ip(&self) -> std::net::IpAddr {
        self.forwarded_for.unwrap_or(self.addr.ip())
    }
}

/// The sending half of a connection.
#[async_trait]
pub trait FrameSink: Send {
    /// Sends frames in order, flushing once at the end.
    async fn send(&mut self, frames: &[Bytes]) -> Result<(), TransportError>;
    /// Sends a close frame with the reason and shuts the connection down.
    async fn close(&mut self, reason: CloseReason) -> Result<(), TransportError>;
}

/// The receiving half of a connection.
///
/// A poll method rather than an `async fn`: a boxed future per frame (what `async_trait`
/// makes) was an allocation for every frame received and, pending, part of every idle
/// connection's memory. Await frames with [`recv`](trait.FrameStream.html#method.recv) on a
/// `dyn FrameStream`.
pub trait FrameStream: Send {
    /// Polls for the next frame; `Ready(None)` when the peer closed the connection, with the
    /// reason it gave.
    ///
    /// Everything in progress stays in `self` between calls — a frame partly read, an answer
    /// to the peer being written — so a caller may stop polling at any point and lose nothing:
    /// the relay races `recv` against finished requests and drops it when another branch wins.
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, TransportError>>>;
    /// The close reason the peer gave, once `recv` has returned `None`.
    fn close_reason(&self) -> Option<CloseReason> {
        None
    }
}

impl dyn FrameStream + '_ {
    /// The next frame; `None` when the peer closed the connection. Cancel-safe
    /// ([`FrameStream::poll_recv`]).
    pub fn recv(
        &mut self,
    ) -> impl Future<Output = Option<Result<Bytes, TransportError>>> + Send + '_ {
        std::future::poll_fn(move |cx| self.poll_recv(cx))
    }
}

/// An established connection, already split.
pub struct Connection {
    /// Where frames go.
    pub sink: Box<dyn FrameSink>,
    /// Where frames come from.
    pub stream: Box<dyn FrameStream>,
    /// Who the peer is.
    pub peer: PeerInfo,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// A future that completes a connection's handshake.
pub type Handshake = Pin<Box<dyn Future<Output = Result<Connection, TransportError>> + Send>>;

/// A connection that was accepted but not yet handshaken.
pub struct Incoming {
    /// The socket peer.
    pub addr: SocketAddr,
    /// The handshake; run it under a timeout, off the accept loop.
    pub handshake: Handshake,
}

/// A bound listener.
#[async_trait]
pub trait Listener: Send {
    /// Waits for the next connection.
    async fn accept(&mut self) -> Result<Incoming, TransportError>;
    /// The address actually bound (useful with port 0).
    fn local_addr(&self) -> SocketAddr;
    /// The URL clients should use to reach this listener (e.g. `wss://127.0.0.1:7443/`).
    fn url(&self) -> String;
}

/// A way to carry frames between client and relay.
#[async_trait]
pub trait Transport: Send + Sync {
    /// The kind name this transport registered under.
    fn kind(&self) -> &'static str;
    /// Binds a listener (relay side).
    async fn bind(&self, address: &str) -> Result<Box<dyn Listener>, TransportError>;
    /// Connects to a relay (client side).
    async fn connect(&self, url: &str) -> Result<Connection, TransportError>;
}

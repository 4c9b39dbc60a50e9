//! `syncra-transport-ws`: the WebSocket transport (tokio-tungstenite on rustls), both the relay's
//! accepting side and the client's connecting side.
//!
//! One WebSocket binary message carries one protocol frame. Text messages are a protocol error.
//!
//! What this crate must never do:
//! - offer plaintext WebSocket on a non-loopback address, unless the operator says a
//!   TLS-terminating proxy is in front (`behind_tls_proxy = true`);
//! - enable permessage-deflate (compression next to secrets invites CRIME-style oracles, and
//!   decompression bombs); tungstenite is built without it;
//! - connect to a `wss://` relay without verifying its certificate (system roots, or a pinned CA
//!   file for self-hosting);
//! - trust `X-Forwarded-For` from anyone but the configured proxies.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use async_trait::async_trait;
use bytes::{Buf, Bytes, BytesMut};
use frames::{Decoder, FrameError, Parsed, Role, opcode};
use head::HeadReader;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use syncra_core::error::{PluginError, TransportError};
use syncra_core::registry::{Kinds, typed_config};
use syncra_core::transport::{
    CloseReason, Connection, FrameSink, FrameStream, Incoming, Listener, PeerInfo, Transport,
};
use syncra_core::wire::{DEFAULT_MAX_FRAME, ErrorCode};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub mod frames;
mod head;

/// The kind name this transport registers under.
pub const KIND: &str = "ws";

/// tungstenite's read buffer, for the handshake only. Small: a handshake request is a few
/// hundred bytes (a longer one is read in several pieces), and what a login storm allocates for
/// a moment stays in the relay's memory as holes between the sessions that follow.
const HANDSHAKE_BUFFER: usize = 512;

/// TLS certificate and key for the accepting side.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM file with the certificate chain.
    pub cert: PathBuf,
    /// PEM file with the private key.
    pub key: PathBuf,
}

/// Configuration of the WebSocket transport (`[transport]` with `kind = "ws"`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WsConfig {
    /// Serve TLS with this certificate (relay side). Without it, only loopback is allowed
    /// unless `behind_tls_proxy` is set.
    pub tls: Option<TlsFiles>,
    /// A TLS-terminating proxy is in front: allow plaintext on any address.
    pub behind_tls_proxy: bool,
    /// Proxies whose `X-Forwarded-For` header is believed (only with `behind_tls_proxy`).
    pub trusted_proxies: Vec<IpAddr>,
    /// Largest frame accepted, in bytes.
    pub max_frame: usize,
    /// Client side: a PEM file of CA certificates to trust instead of the system roots
    /// (self-hosted relays with their own CA).
    pub ca_file: Option<PathBuf>,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            tls: None,
            behind_tls_proxy: false,
            trusted_proxies: vec![
                IpAddr::from([127, 0, 0, 1]),
                IpAddr::from([0, 0, 0, 0, 0, 0, 0, 1]),
            ],
            max_frame: DEFAULT_MAX_FRAME,
            ca_file: None,
        }
    }
}

/// The WebSocket transport.
pub struct WsTransport {
    config: WsConfig,
    acceptor: Option<TlsAcceptor>,
}

impl std::fmt::Debug for WsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsTransport")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn config_error(message: String) -> TransportError {
    TransportError::Config(message)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| config_error(format!("reading certificates from {}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| config_error(format!("parsing certificates in {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(config_error(format!(
            "{} contains no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl WsTransport {
    /// Builds the transport, loading TLS material now so a bad file fails at start-up with its
    /// path in the message, not at the first connection.
    pub fn new(config: WsConfig) -> Result<Self, TransportError> {
        let acceptor = match &config.tls {
            None => None,
            Some(files) => {
                let certs = read_certs(&files.cert)?;
                let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
                    config_error(format!("reading private key {}: {e}", files.key.display()))
                })?;
                let server = rustls::ServerConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| config_error(format!("tls: {e}")))?
                    .with_no_client_auth()
                    .with_single_cert(certs, key)
                    .map_err(|e| {
                        config_error(format!(
                            "certificate {} and key {} do not form a usable pair: {e}",
                            files.cert.display(),
                            files.key.display()
                        ))
                    })?;
                Some(TlsAcceptor::from(Arc::new(server)))
            }
        };
        Ok(WsTransport { config, acceptor })
    }

    /// tungstenite's settings, used for the opening handshake only: frames are read and written
    /// by [`frames`] after it.
    fn ws_config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .max_message_size(Some(self.config.max_frame))
            .max_frame_size(Some(self.config.max_frame))
            .read_buffer_size(HANDSHAKE_BUFFER)
    }

    fn client_tls(&self) -> Result<TlsConnector, TransportError> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.config.ca_file {
            Some(path) => {
                for cert in read_certs(path)? {
                    roots.add(cert).map_err(|e| {
                        config_error(format!("CA certificate in {}: {e}", path.display()))
                    })?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for cert in found.certs {
                    // A malformed system certificate is skipped, like every TLS client does.
                    let _ = roots.add(cert);
                }
                if roots.is_empty() {
                    return Err(config_error(
                        "no system CA certificates found; install ca-certificates or set ca_file"
                            .into(),
                    ));
                }
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error(format!("tls: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TlsConnector::from(Arc::new(config)))
    }
}

/// Registers the `ws` transport.
pub fn register(kinds: &mut Kinds<Arc<dyn Transport>, ()>) -> Result<(), PluginError> {
    kinds.register(KIND, |config, ()| async move {
        let config: WsConfig = typed_config("transport", KIND, config)?;
        let transport = WsTransport::new(config).map_err(|e| PluginError::Start {
            category: "transport",
            kind: KIND.into(),
            message: e.to_string(),
        })?;
        Ok(Arc::new(transport) as Arc<dyn Transport>)
    })
}

fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

#[async_trait]
impl Transport for WsTransport {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn bind(&self, address: &str) -> Result<Box<dyn Listener>, TransportError> {
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| TransportError::Io {
                action: "bind",
                address: address.to_owned(),
                source,
            })?;
        let local = listener.local_addr().map_err(|source| TransportError::Io {
            action: "bind",
            address: address.to_owned(),
            source,
        })?;
        if self.acceptor.is_none() && !self.config.behind_tls_proxy && !is_loopback(&local) {
            return Err(config_error(format!(
                "refusing plaintext WebSocket on non-loopback address {local}: configure \
                 [transport.tls] cert and key, or set behind_tls_proxy = true if a \
                 TLS-terminating proxy is in front"
            )));
        }
        Ok(Box::new(WsListener {
            listener,
            local,
            acceptor: self.acceptor.clone(),
            ws_config: self.ws_config(),
            max_frame: self.config.max_frame,
            trust_forwarded: self.config.behind_tls_proxy,
            trusted_proxies: self.config.trusted_proxies.clone(),
        }))
    }

    async fn connect(&self, url: &str) -> Result<Connection, TransportError> {
        let request = tungstenite::client::IntoClientRequest::into_client_request(url)
            .map_err(|e| config_error(format!("{url:?} is not a WebSocket URL: {e}")))?;
        let uri = request.uri().clone();
        let secure = match uri.scheme_str() {
            Some("wss") => true,
            Some("ws") => false,
            _ => {
                return Err(config_error(format!(
                    "{url:?}: the relay URL must start with ws:// or wss://"
                )));
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| config_error(format!("{url:?} has no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|source| TransportError::Io {
                action: "connect",
                address: format!("{host}:{port}"),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let peer = tcp.peer_addr().map_err(|source| TransportError::Io {
            action: "connect",
            address: format!("{host}:{port}"),
            source,
        })?;
        let peer_info = PeerInfo {
            addr: peer,
            forwarded_for: None,
        };
        let handshake_err = |why: String| TransportError::Handshake {
            peer: url.to_owned(),
            why,
        };
        if secure {
            let name = ServerName::try_from(host.clone())
                .map_err(|_| config_error(format!("{host:?} is not a valid TLS server name")))?;
            let tls = self
                .client_tls()?
                .connect(name, tcp)
                .await
                .map_err(|e| handshake_err(format!("tls: {e}")))?;
            self.upgrade(request, tls, peer_info)
                .await
                .map_err(|e| handshake_err(e.to_string()))
        } else {
            self.upgrade(request, tcp, peer_info)
                .await
                .map_err(|e| handshake_err(e.to_string()))
        }
    }
}

impl WsTransport {
    /// The client's opening handshake over an established stream (TLS or not).
    async fn upgrade<S>(
        &self,
        request: tungstenite::handshake::client::Request,
        stream: S,
        peer: PeerInfo,
    ) -> Result<Connection, tungstenite::Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (ws, _) = tokio_tungstenite::client_async_with_config(
            request,
            HeadReader::new(stream),
            Some(self.ws_config()),
        )
        .await?;
        Ok(link(ws, Role::Client, peer, self.config.max_frame))
    }
}

struct WsListener {
    listener: TcpListener,
    local: SocketAddr,
    acceptor: Option<TlsAcceptor>,
    ws_config: WebSocketConfig,
    max_frame: usize,
    trust_forwarded: bool,
    trusted_proxies: Vec<IpAddr>,
}

/// Reads the client address a trusted proxy put in `X-Forwarded-For`: the right-most entry of
/// the last header line is the one the proxy itself added (anything before it came from the
/// client and may be forged).
fn forwarded_for(request: &Request) -> Option<IpAddr> {
    let value = request
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .next_back()?
        .to_str()
        .ok()?;
    value.rsplit(',').next()?.trim().parse().ok()
}

#[async_trait]
impl Listener for WsListener {
    async fn accept(&mut self) -> Result<Incoming, TransportError> {
        let (tcp, addr) = self
            .listener
            .accept()
            .await
            .map_err(|source| TransportError::Io {
                action: "accept",
                address: self.local.to_string(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let acceptor = self.acceptor.clone();
        let ws_config = self.ws_config;
        let max_frame = self.max_frame;
        let trust = self.trust_forwarded && self.trusted_proxies.contains(&addr.ip());
        let handshake = async move {
            let fail = |why: String| TransportError::Handshake {
                peer: addr.to_string(),
                why,
            };
            match acceptor {
                Some(acceptor) => {
                    let tls = acceptor.accept(tcp).await.map_err(|e| {
                        if e.kind() == std::io::ErrorKind::UnexpectedEof {
                            closed_before_handshake()
                        } else {
                            fail(format!("tls: {e}"))
                        }
                    })?;
                    accept_ws(tls, addr, trust, ws_config, max_frame).await
                }
                None => accept_ws(tcp, addr, trust, ws_config, max_frame).await,
            }
        };
        Ok(Incoming {
            addr,
            handshake: Box::pin(handshake),
        })
    }

    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn url(&self) -> String {
        let scheme = if self.acceptor.is_some() { "wss" } else { "ws" };
        format!("{scheme}://{}/", self.local)
    }
}

/// The WebSocket upgrade over an accepted stream (TLS or not), reading the forwarded client
/// address when the peer is a trusted proxy.
async fn accept_ws<S>(
    stream: S,
    addr: SocketAddr,
    trust_forwarded: bool,
    ws_config: WebSocketConfig,
    max_frame: usize,
) -> Result<Connection, TransportError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut forwarded = None;
    // The error type is fixed by tungstenite's `Callback` trait.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: Response| {
        if trust_forwarded {
            forwarded = forwarded_for(req);
        }
        Ok(resp)
    };
    let ws = tokio_tungstenite::accept_hdr_async_with_config(
        HeadReader::new(stream),
        callback,
        Some(ws_config),
    )
    .await
    .map_err(|e| match e {
        tungstenite::Error::Protocol(tungstenite::error::ProtocolError::HandshakeIncomplete)
        | tungstenite::Error::ConnectionClosed
        | tungstenite::Error::AlreadyClosed => closed_before_handshake(),
        tungstenite::Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            closed_before_handshake()
        }
        e => TransportError::Handshake {
            peer: addr.to_string(),
            why: e.to_string(),
        },
    })?;
    let peer = PeerInfo {
        addr,
        forwarded_for: forwarded,
    };
    Ok(link(ws, Role::Server, peer, max_frame))
}

/// The peer closed before finishing its handshake: a TCP health check or port scan, not a
/// failed handshake worth a warning.
fn closed_before_handshake() -> TransportError {
    TransportError::Closed("the peer closed the connection during the handshake".into())
}

/// Takes a connection over from tungstenite once its handshake is done: from here on frames are
/// read and written by [`frames`].
fn link<S>(
    ws: WebSocketStream<HeadReader<S>>,
    role: Role,
    peer: PeerInfo,
    max_frame: usize,
) -> Connection
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (stream, after_head) = ws.into_inner().into_parts();
    let (sink, stream) = halves(stream, after_head, role, max_frame);
    Connection {
        sink: Box::new(sink),
        stream: Box::new(stream),
        peer,
    }
}

/// The two sides of a connection whose handshake is done; `after_head` is what was read after
/// the handshake's head.
fn halves<S>(
    stream: S,
    after_head: BytesMut,
    role: Role,
    max_frame: usize,
) -> (WsSink<S>, WsStream<S>)
where
    S: AsyncRead + AsyncWrite,
{
    let (read, write) = tokio::io::split(stream);
    let writer = Arc::new(tokio::sync::Mutex::new(Writer {
        io: write,
        out: BytesMut::new(),
        closed: false,
        role,
    }));
    let sink = WsSink {
        writer: writer.clone(),
    };
    let stream = WsStream {
        io: read,
        buf: after_head,
        decoder: Decoder::new(role, max_frame),
        writer,
        reply: None,
        replying: None,
        close: None,
        ended: false,
        busy: false,
    };
    (sink, stream)
}

/// The writing side of a connection, shared by its sink and its stream (which answers pings and
/// close frames).
struct Writer<S> {
    io: WriteHalf<S>,
    /// Frames encoded and not yet written; no capacity once written.
    out: BytesMut,
    /// A close frame was queued: nothing more may be sent.
    closed: bool,
    role: Role,
}

impl<S: AsyncWrite> Writer<S> {
    /// Encodes frames with opcode `op` into the out buffer (masked with fresh keys by a client).
    fn queue<P: AsRef<[u8]>>(&mut self, op: u8, payloads: &[P]) {
        let masked = self.role == Role::Client;
        let mut keys = vec![0u8; if masked { 4 * payloads.len() } else { 0 }];
        if masked {
            syncra_core::crypto::fill_random(&mut keys);
        }
        let mut keys = keys.as_chunks::<4>().0.iter();
        self.out.reserve(
            payloads
                .iter()
                .map(|p| frames::encoded_len(p.as_ref().len(), masked))
                .sum(),
        );
        for payload in payloads {
            frames::encode(&mut self.out, op, payload.as_ref(), keys.next().copied());
        }
    }

    /// Writes the out buffer. Cancel-safe: what is not written yet stays for the next flush.
    async fn flush(&mut self) -> std::io::Result<()> {
        while !self.out.is_empty() {
            let n = self.io.write(&self.out).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            self.out.advance(n);
        }
        // Written: an idle connection holds no out buffer.
        self.out = BytesMut::new();
        self.io.flush().await
    }
}

fn io_error(e: std::io::Error) -> TransportError {
    match e.kind() {
        std::io::ErrorKind::BrokenPipe
        | std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::ConnectionAborted
        | std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::WriteZero => TransportError::Closed(format!("connection lost: {e}")),
        _ => TransportError::Other(e.to_string()),
    }
}

struct WsSink<S> {
    writer: Arc<tokio::sync::Mutex<Writer<S>>>,
}

#[async_trait]
impl<S> FrameSink for WsSink<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn send(&mut self, frames: &[Bytes]) -> Result<(), TransportError> {
        let mut writer = self.writer.lock().await;
        if writer.closed {
            return Err(TransportError::Closed("connection closed".into()));
        }
        writer.queue(opcode::BINARY, frames);
        writer.flush().await.map_err(io_error)
    }

    async fn close(&mut self, reason: CloseReason) -> Result<(), TransportError> {
        let code = match reason.code {
            Some(code) => code.close_code(),
            None => 1000,
        };
        let mut writer = self.writer.lock().await;
        if !writer.closed {
            writer.closed = true;
            let payload = frames::close_payload(code, &reason.message);
            writer.queue(opcode::CLOSE, std::slice::from_ref(&payload));
        }
        writer.flush().await.map_err(io_error)?;
        writer.io.shutdown().await.map_err(io_error)
    }
}

/// The most bytes read from the socket at once.
const BURST: usize = 16 * 1024;

/// The first read after a quiet spell asks for this much; a read that fills it is followed by
/// reads of [`BURST`] until the socket runs dry. A connection that sends a frame now and then
/// (logging in, a chat) never holds a burst's worth, not even for a moment: thousands of them
/// logging in at once would otherwise leave the heap fragmented with freed 16 KiB blocks.
const FIRST_READ: usize = 1024;

/// A partly received frame up to this size is moved out of its burst buffer while the rest is
/// awaited (a larger one keeps the buffer it is being read into).
const SMALL_PARTIAL: usize = 1024;

struct WsStream<S> {
    io: ReadHalf<S>,
    /// Bytes read and not yet decoded. It has capacity only while bytes are waiting: it is
    /// allocated (a burst's worth) when the socket has data and freed as soon as the socket has
    /// none, so an idle connection holds no read buffer, and a busy one makes one system call
    /// per burst.
    buf: BytesMut,
    decoder: Decoder,
    writer: Arc<tokio::sync::Mutex<Writer<S>>>,
    /// A pong or close frame to send in reply, not yet handed to the writer.
    reply: Option<(u8, Bytes)>,
    /// A reply being queued on the writer and flushed; kept here until done, so a caller that
    /// stops polling loses nothing.
    replying: Option<Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>>>,
    close: Option<CloseReason>,
    /// Nothing more will be read: the peer closed, or broke the protocol.
    ended: bool,
    /// The last read filled what it was given: more is likely waiting.
    busy: bool,
}

impl<S: AsyncRead + AsyncWrite> WsStream<S> {
    /// Reads what the socket has into `buf`: `Ok(0)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let want = if self.busy { BURST } else { FIRST_READ };
        if self.buf.capacity() - self.buf.len() < want / 2 {
            self.buf.reserve(want);
        }
        let room = self.buf.capacity() - self.buf.len();
        let read = tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf);
        match &read {
            Poll::Ready(Ok(n)) => self.busy = *n == room,
            Poll::Ready(Err(_)) => {}
            Poll::Pending => {
                // Nothing waiting: give the memory back until the socket has data again.
                self.busy = false;
                if self.buf.is_empty() {
                    self.buf = BytesMut::new();
                } else if self.buf.len() <= SMALL_PARTIAL && self.buf.capacity() > 2 * SMALL_PARTIAL
                {
                    self.buf = BytesMut::from(&self.buf[..]);
                }
            }
        }
        read
    }
}

impl<S> FrameStream for WsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, TransportError>>> {
        loop {
            if self.replying.is_none()
                && let Some((op, payload)) = self.reply.take()
            {
                // Boxed: rare, and it owns what it needs, so it goes on at the next poll.
                let writer = self.writer.clone();
                self.replying = Some(Box::pin(async move {
                    let mut writer = writer.lock().await;
                    // After a close frame nothing more may be sent, a pong included.
                    if !writer.closed {
                        writer.closed = op == opcode::CLOSE;
                        writer.queue(op, std::slice::from_ref(&payload));
                    }
                    writer.flush().await
                }));
            }
            if let Some(replying) = &mut self.replying {
                // Answered before anything more is read: a peer that pings cannot pile up
                // answers faster than they are written. If the peer is gone, what it sent
                // before is still read below.
                ready!(replying.as_mut().poll(cx)).ok();
                self.replying = None;
                continue;
            }
            if self.ended {
                return Poll::Ready(None);
            }
            match self.decoder.decode(&mut self.buf) {
                Ok(Some(Parsed::Binary(bytes))) => return Poll::Ready(Some(Ok(bytes))),
                Ok(Some(Parsed::Text)) => {
                    return Poll::Ready(Some(Err(TransportError::Other(
                        "text messages are not part of the protocol; frames are binary".into(),
                    ))));
                }
                Ok(Some(Parsed::Ping(payload))) => {
                    self.reply = Some((opcode::PONG, payload));
                    continue;
                }
                Ok(Some(Parsed::Pong)) => continue,
                Ok(Some(Parsed::Close(frame))) => {
                    let echo = match &frame {
                        Some((code, _)) => frames::close_payload(*code, "").freeze(),
                        None => Bytes::new(),
                    };
                    self.close = Some(match frame {
                        Some((n, reason)) => CloseReason {
                            code: (4000..5000)
                                .contains(&n)
                                .then(|| ErrorCode::from_u16(n - 4000)),
                            message: reason,
                        },
                        None => CloseReason::normal(""),
                    });
                    // Answered with a close frame of the same code (RFC 6455 §5.5.1), sent at
                    // the top of the loop.
                    self.reply = Some((opcode::CLOSE, echo));
                    self.ended = true;
                    continue;
                }
                Ok(None) => {}
                Err(FrameError::TooLarge { size, max }) => {
                    self.ended = true;
                    return Poll::Ready(Some(Err(TransportError::TooLarge {
                        size: usize::try_from(size).unwrap_or(usize::MAX),
                        max,
                    })));
                }
                Err(e @ FrameError::Protocol(_)) => {
                    self.ended = true;
                    return Poll::Ready(Some(Err(TransportError::Protocol(e.to_string()))));
                }
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) => self.ended = true,
                Ok(_) => {}
                Err(e) => {
                    self.ended = true;
                    return Poll::Ready(Some(Err(io_error(e))));
                }
            }
        }
    }

    fn close_reason(&self) -> Option<CloseReason> {
        self.close.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn masked(payload: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        frames::encode(&mut out, opcode::BINARY, payload, Some([9, 8, 7, 6]));
        out
    }

    /// The next frame of a stream of this crate's own type.
    fn recv<S>(
        stream: &mut WsStream<S>,
    ) -> impl Future<Output = Option<Result<Bytes, TransportError>>> + '_
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        std::future::poll_fn(move |cx| stream.poll_recv(cx))
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_read_or_write_buffer() {
        let (ours, mut peer) = tokio::io::duplex(256 * 1024);
        let (mut sink, mut stream) = halves(ours, BytesMut::new(), Role::Server, 100_000);
        // A busy spell: more than a burst's worth in one go, in frames of every size class.
        let mut sent = Vec::new();
        let mut wire = BytesMut::new();
        for len in [10usize, 200, 5_000, 70_000, 3] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 249) as u8).collect();
            wire.extend(masked(&payload));
            sent.push(payload);
        }
        peer.write_all(&wire).await.unwrap();
        for payload in &sent {
            assert_eq!(recv(&mut stream).await.unwrap().unwrap(), &payload[..]);
        }
        // Drained: the next recv waits, and while it waits no read buffer is held.
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(20), recv(&mut stream)).await;
        assert!(waiting.is_err(), "nothing was sent, so recv must wait");
        assert_eq!(stream.buf.capacity(), 0);
        // Half a frame waiting is kept compactly, and completed by the rest.
        let frame = masked(b"split across two writes");
        peer.write_all(&frame[..7]).await.unwrap();
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(20), recv(&mut stream)).await;
        assert!(waiting.is_err());
        assert!(
            stream.buf.capacity() <= 2 * SMALL_PARTIAL,
            "{}",
            stream.buf.capacity()
        );
        peer.write_all(&frame[7..]).await.unwrap();
        assert_eq!(
            recv(&mut stream).await.unwrap().unwrap(),
            &b"split across two writes"[..]
        );
        // Written: the out buffer is given back.
        sink.send(&[Bytes::from(vec![1u8; 50_000])]).await.unwrap();
        assert_eq!(sink.writer.lock().await.out.capacity(), 0);
    }
}

//! `syncra-test-relay`: a real relay in-process on `127.0.0.1:0`, and a protocol-level test client.
//!
//! It is apart from `syncra-test-support` so that the conformance suites (which need only core)
//! do not pull the relay, Wasmtime and sqlx into every broker's and store's test build.
//!
//! The client speaks raw frames over the real WebSocket transport so that tests can send
//! exactly what an attacker would (garbage, replays, forged proofs) as well as what an honest
//! client sends. Every wait has a deadline; nothing sleeps to wait for readiness.

use std::path::PathBuf;

use bytes::Bytes;
use syncra_core::crypto::envelope::{Recipient, seal};
use syncra_core::crypto::keys::{IdentityKeyPair, PrekeyRing, PrekeySecret};
use syncra_core::transport::{CloseReason, Connection, Transport};
use syncra_core::wire::{
    DEFAULT_MAX_FRAME, ErrorCode, Frame, NONCE_LEN, RecipientOutcome, RequestId, login_statement,
    register_statement,
};
use syncra_core::{IdentityRecord, UserId};
use syncra_relay::{Relay, RelayConfig};
use syncra_transport_ws::{WsConfig, WsTransport};

use syncra_test_support::DEADLINE;

/// A relay running in this process with its own temporary data directory.
pub struct TestRelay {
    /// The running relay.
    pub relay: Relay,
    /// The temporary data directory (deleted on drop).
    pub dir: tempfile::TempDir,
}

impl std::fmt::Debug for TestRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestRelay")
            .field("url", &self.relay.url())
            .finish()
    }
}

/// A relay configuration for tests: loopback with port 0, a temp data dir, admin on port 0.
pub fn test_relay_config(data_dir: PathBuf) -> RelayConfig {
    RelayConfig {
        data_dir,
        listen: "127.0.0.1:0".into(),
        admin_listen: "127.0.0.1:0".into(),
        ..RelayConfig::default()
    }
}

impl TestRelay {
    /// Starts a relay with the test defaults, adjusted by `configure`.
    pub async fn start(configure: impl FnOnce(&mut RelayConfig)) -> TestRelay {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = test_relay_config(dir.path().join("data"));
        configure(&mut config);
        let relay = Relay::start(config).await.expect("relay starts");
        TestRelay { relay, dir }
    }

    /// The URL clients connect to.
    pub fn url(&self) -> &str {
        self.relay.url()
    }

    /// Opens a raw protocol connection and reads the challenge.
    pub async fn connect(&self) -> RawClient {
        RawClient::connect(self.url()).await
    }

    /// Fetches an admin endpoint path and returns (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let addr = self.relay.admin_addr().expect("admin endpoint enabled");
        http_get(addr, path).await
    }
}

/// A minimal HTTP/1.1 GET, enough for `/healthz` and `/metrics`.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(DEADLINE, tokio::net::TcpStream::connect(addr))
        .await
        .expect("admin connect in time")
        .expect("admin connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write request");
    let mut buf = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut buf))
        .await
        .expect("admin answers in time")
        .expect("read response");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("http status");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A raw protocol connection.
pub struct RawClient {
    /// The connection.
    pub conn: Connection,
    /// The URL it dialled (signed into logins).
    pub url: String,
    /// The relay id from the latest challenge.
    pub relay_id: String,
    /// The nonce from the latest challenge.
    pub nonce: [u8; NONCE_LEN],
    /// Every frame received, in order, for assertions about what the relay said.
    pub log: Vec<Frame>,
    /// Frames read while waiting for another kind (replies vs. deliveries).
    pending: Vec<Frame>,
}

impl std::fmt::Debug for RawClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawClient")
            .field("relay_id", &self.relay_id)
            .finish_non_exhaustive()
    }
}

/// What [`RawClient::recv`] got.
#[derive(Debug)]
pub enum Received {
    /// A frame.
    Frame(Frame),
    /// The relay closed the connection, with its reason.
    Closed(Option<CloseReason>),
}

impl RawClient {
    /// Connects and reads the first challenge.
    pub async fn connect(url: &str) -> RawClient {
        let transport = WsTransport::new(WsConfig::default()).expect("transport");
        let conn = tokio::time::timeout(DEADLINE, transport.connect(url))
            .await
            .expect("connect in time")
            .expect("connect");
        let mut client = RawClient {
            conn,
            url: url.to_owned(),
            relay_id: String::new(),
            nonce: [0; NONCE_LEN],
            log: Vec::new(),
            pending: Vec::new(),
        };
        client.expect_challenge().await;
        client
    }

    /// Sends raw bytes as one frame.
    pub async fn send_bytes(&mut self, bytes: impl Into<Bytes>) {
        self.conn
            .sink
            .send(&[bytes.into()])
            .await
            .expect("send to relay");
    }

    /// Sends a frame.
    pub async fn send(&mut self, frame: &Frame) {
        self.send_bytes(frame.encode()).await;
    }

    /// The next frame or the close, within the deadline.
    pub async fn recv(&mut self) -> Received {
        let next = tokio::time::timeout(DEADLINE, self.conn.stream.recv())
            .await
            .expect("the relay answers in time");
        match next {
            None => Received::Closed(self.conn.stream.close_reason()),
            Some(Err(_)) => Received::Closed(self.conn.stream.close_reason()),
            Some(Ok(bytes)) => {
                let frame = Frame::decode(&bytes, DEFAULT_MAX_FRAME).expect("relay frames decode");
                if let Frame::Challenge {
                    relay_id, nonce, ..
                } = &frame
                {
                    self.relay_id = relay_id.clone();
                    self.nonce = *nonce;
                }
                self.log.push(frame.clone());
                Received::Frame(frame)
            }
        }
    }

    /// The next frame; panics on close.
    pub async fn frame(&mut self) -> Frame {
        match self.recv().await {
            Received::Frame(f) => f,
            Received::Closed(r) => panic!("relay closed the connection: {r:?}"),
        }
    }

    /// The next frame that is not a delivery (deliveries are kept for [`RawClient::delivery`]).
    /// The mailbox backlog (`Pending`, `PendingEnd`) is skipped: tests of the mailbox read it
    /// with [`RawClient::frame`].
    pub async fn reply(&mut self) -> Frame {
        if let Some(pos) = self
            .pending
            .iter()
            .position(|f| !matches!(f, Frame::Deliver { .. }))
        {
            return self.pending.remove(pos);
        }
        loop {
            match self.frame().await {
                f @ Frame::Deliver { .. } => self.pending.push(f),
                Frame::Pending { .. } | Frame::PendingEnd { .. } => {}
                f => return f,
            }
        }
    }

    /// Reads until a challenge arrives.
    pub async fn expect_challenge(&mut self) {
        match self.frame().await {
            Frame::Challenge { .. } => {}
            other => panic!("expected a challenge, got {other:?}"),
        }
    }

    /// Expects an error frame with this code; returns its message.
    pub async fn expect_error(&mut self, code: ErrorCode) -> String {
        match self.reply().await {
            Frame::Error {
                code: got, message, ..
            } => {
                assert_eq!(got, code, "error message: {message}");
                message
            }
            other => panic!("expected error {code:?}, got {other:?}"),
        }
    }

    /// Expects the relay to close the connection with this code.
    pub async fn expect_close(&mut self, code: ErrorCode) {
        loop {
            match self.recv().await {
                Received::Closed(reason) => {
                    let reason = reason.expect("a close reason");
                    assert_eq!(reason.code, Some(code), "close message: {}", reason.message);
                    return;
                }
                Received::Frame(_) => continue,
            }
        }
    }
}

/// A test user: identity, prekeys, handle.
#[derive(Debug)]
pub struct TestUser {
    /// The identity key pair.
    pub identity: IdentityKeyPair,
    /// The prekey ring.
    pub ring: PrekeyRing,
    /// The handle.
    pub handle: String,
}

impl TestUser {
    /// A new user with a unique handle starting with `prefix`.
    pub fn new(prefix: &str) -> TestUser {
        let identity = IdentityKeyPair::generate();
        let ring = PrekeyRing::new(PrekeySecret::generate(
            &identity,
            syncra_core::now_ms() / 1000,
        ));
        TestUser {
            identity,
            ring,
            handle: syncra_test_support::unique_name(prefix),
        }
    }

    /// The user id.
    pub fn id(&self) -> UserId {
        self.identity.user_id()
    }

    /// The registration frame for the client's current challenge.
    pub fn register_frame(&self, client: &RawClient) -> Frame {
        let prekey = self.ring.current().signed().clone();
        let identity_key = self.identity.public();
        let statement = register_statement(
            &client.relay_id,
            &client.nonce,
            &self.handle,
            &identity_key,
            &prekey,
        );
        Frame::Register {
            handle: self.handle.clone(),
            identity_key,
            prekey,
            signature: self.identity.sign(&statement),
        }
    }

    /// The login frame for the client's current challenge.
    pub fn auth_frame(&self, client: &RawClient) -> Frame {
        let statement = login_statement(&client.relay_id, &client.url, &client.nonce, &self.id());
        Frame::Auth {
            user_id: self.id(),
            url: client.url.clone(),
            signature: self.identity.sign(&statement),
        }
    }

    /// Registers on a fresh connection; returns the authenticated client and its token.
    pub async fn register(&self, url: &str) -> (RawClient, String) {
        let mut c = RawClient::connect(url).await;
        let f = self.register_frame(&c);
        c.send(&f).await;
        let token = expect_auth_ok(&mut c, self.id()).await;
        (c, token)
    }

    /// Logs in on a fresh connection.
    pub async fn login(&self, url: &str) -> RawClient {
        let mut c = RawClient::connect(url).await;
        let f = self.auth_frame(&c);
        c.send(&f).await;
        expect_auth_ok(&mut c, self.id()).await;
        c
    }

    /// What others seal to.
    pub fn recipient(&self) -> Recipient {
        Recipient {
            user_id: self.id(),
            prekey: *self.ring.current().public(),
        }
    }

    /// The record the relay should hold for this user.
    pub fn record(&self) -> IdentityRecord {
        IdentityRecord {
            user_id: self.id(),
            handle: syncra_core::Handle::parse(&self.handle).expect("valid handle"),
            identity_key: self.identity.public(),
            prekey: self.ring.current().signed().clone(),
        }
    }

    /// Opens an envelope sealed to this user (sender unpinned, a fresh replay guard) and returns
    /// its body; panics if it does not open.
    pub fn open(&self, envelope: &[u8]) -> Vec<u8> {
        use syncra_core::crypto::envelope::{AcceptWindow, Opener, ReplayGuard};
        let opener = Opener {
            me: self.id(),
            prekeys: &self.ring,
            pinned: &|_| None,
        };
        let mut guard = ReplayGuard::new(AcceptWindow::default(), 64);
        opener
            .open(envelope, &mut guard, syncra_core::now_ms())
            .expect("the envelope opens")
            .body
    }

    /// Seals `body` to the recipients.
    pub fn seal(&self, to: &[&TestUser], body: &[u8]) -> Vec<u8> {
        let recipients: Vec<Recipient> = to.iter().map(|u| u.recipient()).collect();
        seal(&self.identity, &recipients, body, syncra_core::now_ms())
            .expect("seal")
            .bytes
    }
}

/// Expects `AuthOk` for `user`; returns the token.
pub async fn expect_auth_ok(c: &mut RawClient, user: UserId) -> String {
    match c.reply().await {
        Frame::AuthOk { user_id, token, .. } => {
            assert_eq!(user_id, user);
            token
        }
        other => panic!("expected auth_ok, got {other:?}"),
    }
}

impl RawClient {
    /// Sends an envelope and returns the per-recipient outcomes.
    pub async fn send_envelope(
        &mut self,
        request_id: RequestId,
        envelope: Vec<u8>,
    ) -> Vec<RecipientOutcome> {
        self.send(&Frame::Send {
            request_id,
            envelope: envelope.into(),
        })
        .await;
        match self.reply().await {
            Frame::SendResult {
                request_id: r,
                outcomes,
                ..
            } => {
                assert_eq!(r, request_id);
                outcomes
            }
            other => panic!("expected a send result, got {other:?}"),
        }
    }

    /// The next delivered envelope.
    pub async fn delivery(&mut self) -> Bytes {
        if let Some(pos) = self
            .pending
            .iter()
            .position(|f| matches!(f, Frame::Deliver { .. }))
            && let Frame::Deliver { envelope } = self.pending.remove(pos)
        {
            return envelope;
        }
        loop {
            match self.frame().await {
                Frame::Deliver { envelope } => return envelope,
                // The mailbox backlog is for the tests that read it with `frame`.
                Frame::Pending { .. } | Frame::PendingEnd { .. } => {}
                other => self.pending.push(other),
            }
        }
    }
}

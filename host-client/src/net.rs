//! The client's connection to its relay: one authenticated session, requests matched to
//! replies by request id, deliveries on a channel, keep-alive pings — and a supervisor that
//! reconnects with jittered backoff, resuming with the token when it can.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use syncra_core::crypto::keys::{IdentityKeyPair, SignedPrekey};
use syncra_core::transport::{CloseReason, FrameSink, Transport};
use syncra_core::wire::{
    DEFAULT_MAX_FRAME, ErrorCode, Frame, RecipientOutcome, RequestId, login_statement,
    register_statement,
};
use syncra_core::{IdentityRecord, UserId};
use syncra_transport_ws::{WsConfig, WsTransport};
use tokio::sync::{Mutex, mpsc, oneshot, watch};

/// How long a request waits for its reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long connecting and authenticating may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep-alive interval (the relay's default idle timeout is 120 s).
pub const PING_INTERVAL: Duration = Duration::from_secs(30);

/// Connection failures, split by what the caller should do about them.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The relay cannot be reached now; try again later (messages wait in the outbox).
    #[error("relay unreachable: {0}")]
    Unreachable(String),
    /// The relay refused, with a reason.
    #[error("{message} ({code})")]
    Refused {
        /// The code.
        code: ErrorCode,
        /// The relay's explanation.
        message: String,
    },
    /// The connection dropped while waiting.
    #[error("connection to the relay lost")]
    Disconnected,
    /// The relay sent something that makes no sense here.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A plaintext `ws://` URL for a host that is not this machine.
    #[error(
        "refusing plaintext ws:// to {host}: anyone on the path could read and replay the \
         session (its resume token included). Use wss://{host}/ (TLS); for a lab network only, \
         allow plaintext with --insecure-plaintext or insecure_plaintext = true in settings.toml"
    )]
    Plaintext {
        /// The host as written in the URL (escaped for display).
        host: String,
    },
    /// The server's challenge names another relay than the one this identity registered
    /// with: it may be passing another relay's challenge on to obtain a login proof.
    #[error(
        "the server at this address says it is relay {found:?}, but this identity registered \
         with relay {expected:?}; refusing to log in (a server that passes another relay's \
         challenge on could log in there as you). Check the relay URL in settings.toml; if the \
         relay's operator really changed its id, register again"
    )]
    WrongRelay {
        /// The relay id pinned at registration.
        expected: String,
        /// The relay id the challenge named (escaped for display).
        found: String,
    },
}

impl NetError {
    /// Whether trying again later might work (as opposed to a refusal).
    pub fn is_transient(&self) -> bool {
        matches!(self, NetError::Unreachable(_) | NetError::Disconnected)
            && !matches!(self, NetError::Plaintext { .. })
            || matches!(self, NetError::Refused { code, .. } if code.is_transient())
    }
}

/// How to authenticate a new connection.
#[derive(Clone, Debug)]
pub enum Login {
    /// Register this identity under a handle with this prekey.
    Register {
        /// The handle.
        handle: String,
        /// The prekey to publish.
        prekey: SignedPrekey,
    },
    /// Log in as an existing user.
    Auth,
}

/// What a connected session says besides replies.
#[derive(Debug, Clone)]
pub enum Push {
    /// A sealed envelope for me.
    Deliver(Bytes),
    /// A sealed envelope that waited in my mailbox at the relay. Acknowledge it
    /// ([`Session::acknowledge`]) once it is handled (in the history, or refused), or the relay
    /// sends it again at the next login.
    Pending(u64, Bytes),
    /// The mailbox backlog of a login is complete: this many `Pending` came before it.
    BacklogDone {
        /// How many.
        count: u32,
        /// The connection whose login it ends ([`Session::connection`]): the pushes of every
        /// connection share one channel, so one can still be read after its connection closed.
        connection: u64,
    },
    /// An error not tied to a request (for example: messages were dropped).
    Notice(ErrorCode, String),
}

type Pending = Arc<std::sync::Mutex<HashMap<RequestId, oneshot::Sender<Frame>>>>;

/// One authenticated connection.
pub struct Session {
    sink: Mutex<Box<dyn FrameSink>>,
    pending: Pending,
    next_id: AtomicU32,
    closed: Arc<AtomicBool>,
    ended: watch::Receiver<bool>,
    /// The authenticated user.
    pub user: UserId,
    /// This connection's number, unique in the process.
    pub connection: u64,
    /// The relay id the relay's challenge named (pinned at registration).
    pub relay_id: String,
    /// The resume token.
    pub token: String,
    /// When the token expires (ms since the epoch).
    pub token_expires_ms: u64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Builds the transport for a relay URL.
pub fn transport(ca_file: Option<std::path::PathBuf>) -> Result<Arc<WsTransport>, NetError> {
    WsTransport::new(WsConfig {
        ca_file,
        ..WsConfig::default()
    })
    .map(Arc::new)
    .map_err(|e| NetError::Unreachable(e.to_string()))
}

/// The host part of a `ws://` URL, as written (brackets of an IPv6 literal removed); `None`
/// for any other scheme.
fn plaintext_host(url: &str) -> Option<&str> {
    let scheme_end = url.find("://")?;
    if !url[..scheme_end].eq_ignore_ascii_case("ws") {
        return None;
    }
    let rest = &url[scheme_end + 3..];
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit('@').next().unwrap_or("");
    if let Some(v6) = host_port.strip_prefix('[') {
        return Some(v6.split(']').next().unwrap_or(""));
    }
    Some(host_port.split(':').next().unwrap_or(""))
}

/// Whether `host` is literally this machine: `localhost`, 127.0.0.0/8 or ::1. Decided from the
/// text alone, before any name is resolved (a name that resolves to loopback today may not
/// tomorrow).
fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
        || host
            .parse::<std::net::Ipv6Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Refuses a plaintext `ws://` URL unless its host is loopback or `insecure` allows it (then
/// warns, every time). Runs before anything is dialled or resolved.
pub fn check_plaintext(url: &str, insecure: bool) -> Result<(), NetError> {
    let Some(host) = plaintext_host(url) else {
        return Ok(());
    };
    if is_loopback_host(host) {
        return Ok(());
    }
    let host = syncra_core::text::escape_untrusted(host).into_owned();
    if insecure {
        tracing::warn!(
            "WARNING: connecting to {host} over plaintext ws:// (--insecure-plaintext): anyone on \
             the path can read and replay this session; use wss:// outside a lab"
        );
        return Ok(());
    }
    Err(NetError::Plaintext { host })
}

/// Where and as whom to connect.
#[derive(Clone, Copy, Debug)]
pub struct Dial<'a> {
    /// The relay URL, signed into the login as dialled.
    pub url: &'a str,
    /// The relay id pinned at registration: a challenge naming another is refused. `None`
    /// only when registering (the id is pinned from that challenge) or for a home registered
    /// before relay ids were pinned (pinned from this connection's challenge).
    pub relay_id: Option<&'a str>,
    /// The identity.
    pub identity: &'a IdentityKeyPair,
    /// Allow plaintext `ws://` to a host that is not loopback (labs only).
    pub insecure_plaintext: bool,
    /// Nobody reads this session's pushes (a one-shot command such as `syncra send`): the
    /// reader then never waits for room in the push channel, so replies keep flowing however
    /// large the mailbox backlog is. Unread mailbox entries lose nothing: they are not
    /// acknowledged, so the relay keeps them for the next login.
    pub pushes_unread: bool,
}

/// Refuses a challenge for a relay other than the pinned one.
fn check_relay_id(pinned: Option<&str>, challenged: &str) -> Result<(), NetError> {
    match pinned {
        Some(expected) if expected != challenged => Err(NetError::WrongRelay {
            expected: expected.to_owned(),
            found: syncra_core::text::escape_untrusted(challenged).into_owned(),
        }),
        _ => Ok(()),
    }
}

impl Session {
    /// Connects and authenticates: resumes with `token` if given (falling back to a login if
    /// it has expired), else logs in or registers as `login` says.
    pub async fn connect(
        transport: &WsTransport,
        dial: Dial<'_>,
        login: Login,
        token: Option<String>,
        pushes: mpsc::Sender<Push>,
    ) -> Result<Arc<Session>, NetError> {
        tokio::time::timeout(
            CONNECT_TIMEOUT,
            Self::connect_inner(transport, dial, login, token, pushes),
        )
        .await
        .map_err(|_| NetError::Unreachable("the relay did not answer in time".into()))?
    }

    async fn connect_inner(
        transport: &WsTransport,
        dial: Dial<'_>,
        login: Login,
        token: Option<String>,
        pushes: mpsc::Sender<Push>,
    ) -> Result<Arc<Session>, NetError> {
        let Dial {
            url,
            relay_id: pinned,
            identity,
            insecure_plaintext,
            pushes_unread,
        } = dial;
        check_plaintext(url, insecure_plaintext)?;
        let conn = transport
            .connect(url)
            .await
            .map_err(|e| NetError::Unreachable(e.to_string()))?;
        let mut sink = conn.sink;
        let mut stream = conn.stream;
        let mut recv = async || -> Result<Frame, NetError> {
            match stream.recv().await {
                Some(Ok(bytes)) => Frame::decode(&bytes, DEFAULT_MAX_FRAME)
                    .map_err(|e| NetError::Protocol(e.to_string())),
                Some(Err(e)) => Err(NetError::Unreachable(e.to_string())),
                None => Err(match stream.close_reason() {
                    Some(CloseReason {
                        code: Some(code),
                        message,
                    }) => NetError::Refused { code, message },
                    _ => NetError::Disconnected,
                }),
            }
        };
        let (mut relay_id, mut nonce) = match recv().await? {
            Frame::Challenge {
                relay_id, nonce, ..
            } => (relay_id, nonce),
            other => {
                return Err(NetError::Protocol(format!(
                    "expected a challenge, got {}",
                    other.kind()
                )));
            }
        };
        check_relay_id(pinned, &relay_id)?;
        let mut token = token;
        loop {
            let frame = if let Some(t) = token.take() {
                Frame::Resume { token: t }
            } else {
                match &login {
                    Login::Register { handle, prekey } => {
                        let statement = register_statement(
                            &relay_id,
                            &nonce,
                            handle,
                            &identity.public(),
                            prekey,
                        );
                        Frame::Register {
                            handle: handle.clone(),
                            identity_key: identity.public(),
                            prekey: prekey.clone(),
                            signature: identity.sign(&statement),
                        }
                    }
                    Login::Auth => {
                        let statement =
                            login_statement(&relay_id, url, &nonce, &identity.user_id());
                        Frame::Auth {
                            user_id: identity.user_id(),
                            url: url.to_owned(),
                            signature: identity.sign(&statement),
                        }
                    }
                }
            };
            let was_resume = matches!(frame, Frame::Resume { .. });
            sink.send(&[frame.encode()])
                .await
                .map_err(|e| NetError::Unreachable(e.to_string()))?;
            match recv().await? {
                Frame::AuthOk {
                    user_id,
                    token,
                    token_expires_ms,
                } => {
                    if user_id != identity.user_id() {
                        return Err(NetError::Protocol(
                            "the relay authenticated someone else".into(),
                        ));
                    }
                    static CONNECTIONS: AtomicU64 = AtomicU64::new(1);
                    let connection = CONNECTIONS.fetch_add(1, Ordering::Relaxed);
                    let (pending, closed, ended) =
                        spawn_reader(stream, pushes, pushes_unread, connection);
                    let session = Arc::new(Session {
                        sink: Mutex::new(sink),
                        pending,
                        next_id: AtomicU32::new(1),
                        closed,
                        ended,
                        user: user_id,
                        connection,
                        relay_id,
                        token,
                        token_expires_ms,
                    });
                    spawn_pinger(Arc::downgrade(&session));
                    return Ok(session);
                }
                Frame::Error {
                    code: ErrorCode::TokenExpired | ErrorCode::TokenInvalid,
                    ..
                } if was_resume => {
                    // Fall back to a full login on the fresh challenge that follows.
                    match recv().await? {
                        Frame::Challenge {
                            relay_id: r,
                            nonce: n,
                            ..
                        } => {
                            check_relay_id(pinned, &r)?;
                            relay_id = r;
                            nonce = n;
                        }
                        other => {
                            return Err(NetError::Protocol(format!(
                                "expected a challenge, got {}",
                                other.kind()
                            )));
                        }
                    }
                }
                Frame::Error { code, message, .. } => {
                    return Err(NetError::Refused { code, message });
                }
                other => {
                    return Err(NetError::Protocol(format!(
                        "unexpected {} during login",
                        other.kind()
                    )));
                }
            }
        }
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// Waits until the connection ends.
    pub async fn wait_closed(&self) {
        let mut ended = self.ended.clone();
        let _ = ended.wait_for(|e| *e).await;
    }

    /// Sends a request and waits for its reply.
    pub async fn request(&self, make: impl FnOnce(RequestId) -> Frame) -> Result<Frame, NetError> {
        if self.is_closed() {
            return Err(NetError::Disconnected);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed).max(1);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let frame = make(id).encode();
        let sent = self.sink.lock().await.send(&[frame]).await;
        if sent.is_err() {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            return Err(NetError::Disconnected);
        }
        let reply = tokio::time::timeout(REQUEST_TIMEOUT, rx).await;
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        match reply {
            Ok(Ok(Frame::Error { code, message, .. })) => Err(NetError::Refused { code, message }),
            Ok(Ok(frame)) => Ok(frame),
            Ok(Err(_)) => Err(NetError::Disconnected),
            Err(_) => Err(NetError::Unreachable(
                "the relay did not answer in time".into(),
            )),
        }
    }

    /// Looks up a record by handle and verifies it. A record for another handle than the one
    /// asked about is refused: whoever can inject frames (a hostile relay, a broker publisher)
    /// must not pin their own key on a first contact.
    pub async fn lookup_handle(&self, handle: &str) -> Result<IdentityRecord, NetError> {
        let asked = handle.to_owned();
        let reply = self
            .request(|request_id| Frame::LookupHandle {
                request_id,
                handle: asked,
            })
            .await?;
        answer_for_handle(handle, reply)
    }

    /// Looks up a record by user id and verifies it.
    pub async fn lookup_id(&self, user_id: UserId) -> Result<IdentityRecord, NetError> {
        let reply = self
            .request(|request_id| Frame::LookupId {
                request_id,
                user_id,
            })
            .await?;
        let record = verified_record(reply)?;
        if record.user_id != user_id {
            return Err(NetError::Protocol(
                "the relay answered with another user's record".into(),
            ));
        }
        Ok(record)
    }

    /// Publishes a new signed prekey.
    pub async fn rotate_prekey(&self, prekey: SignedPrekey) -> Result<(), NetError> {
        match self
            .request(|request_id| Frame::RotatePrekey { request_id, prekey })
            .await?
        {
            Frame::Ack { .. } => Ok(()),
            other => Err(NetError::Protocol(format!("unexpected {}", other.kind()))),
        }
    }

    /// Sends an envelope; returns one outcome per recipient.
    pub async fn send(&self, envelope: Vec<u8>) -> Result<Vec<RecipientOutcome>, NetError> {
        match self
            .request(|request_id| Frame::Send {
                request_id,
                envelope: envelope.into(),
            })
            .await?
        {
            Frame::SendResult { outcomes, .. } => Ok(outcomes),
            other => Err(NetError::Protocol(format!("unexpected {}", other.kind()))),
        }
    }

    /// Publishes one-time KeyPackages (and a new last-resort one, if given) to the relay's
    /// directory; answers how many one-time ones are held and whether a last-resort one is.
    /// With nothing to publish it only asks.
    pub async fn publish_key_packages(
        &self,
        last_resort: Option<Vec<u8>>,
        one_time: Vec<Vec<u8>>,
    ) -> Result<(u32, bool), NetError> {
        match self
            .request(|request_id| Frame::PublishKeyPackages {
                request_id,
                last_resort: last_resort.map(Bytes::from),
                one_time: one_time.into_iter().map(Bytes::from).collect(),
            })
            .await?
        {
            Frame::KeyPackages {
                one_time,
                last_resort,
                ..
            } => Ok((one_time, last_resort)),
            other => Err(NetError::Protocol(format!("unexpected {}", other.kind()))),
        }
    }

    /// Claims one of `user_id`'s KeyPackages: the bytes (the caller verifies them, including
    /// that they are bound to `user_id`) and whether it is the last-resort one.
    pub async fn claim_key_package(&self, user_id: UserId) -> Result<(Bytes, bool), NetError> {
        match self
            .request(|request_id| Frame::ClaimKeyPackage {
                request_id,
                user_id,
            })
            .await?
        {
            Frame::KeyPackage {
                user_id: whose,
                last_resort,
                package,
                ..
            } if whose == user_id => Ok((package, last_resort)),
            Frame::KeyPackage { .. } => Err(NetError::Protocol(
                "the relay answered with another user's KeyPackage".into(),
            )),
            other => Err(NetError::Protocol(format!("unexpected {}", other.kind()))),
        }
    }

    /// Tells the relay that mailbox entries up to `entry_id` are handled, so it deletes them.
    /// No reply: an entry whose acknowledgement is lost is sent again at the next login, and a
    /// message id is shown once.
    pub async fn acknowledge(&self, entry_id: u64) -> Result<(), NetError> {
        if self.is_closed() {
            return Err(NetError::Disconnected);
        }
        let frame = Frame::Acknowledge { entry_id }.encode();
        self.sink
            .lock()
            .await
            .send(&[frame])
            .await
            .map_err(|_| NetError::Disconnected)
    }

    /// Empties my mailbox at the relay.
    pub async fn clear_mailbox(&self) -> Result<(), NetError> {
        match self
            .request(|request_id| Frame::ClearMailbox { request_id })
            .await?
        {
            Frame::Ack { .. } => Ok(()),
            other => Err(NetError::Protocol(format!("unexpected {}", other.kind()))),
        }
    }

    /// Closes the connection politely.
    pub async fn close(&self) {
        let _ = self
            .sink
            .lock()
            .await
            .close(CloseReason::normal("bye"))
            .await;
    }
}

/// The answer to a lookup of `handle`: a verified record for exactly that handle. Whoever can
/// put frames on the connection (a hostile relay) must not pin another identity on a first
/// contact by answering a lookup with it.
fn answer_for_handle(handle: &str, reply: Frame) -> Result<IdentityRecord, NetError> {
    let record = verified_record(reply)?;
    let expected = syncra_core::Handle::parse(handle).ok();
    if expected.as_ref() != Some(&record.handle) {
        return Err(NetError::Protocol(format!(
            "the relay answered a lookup of {:?} with the record of {:?}",
            syncra_core::text::escape_untrusted(handle),
            syncra_core::text::escape_untrusted(record.handle.as_str())
        )));
    }
    Ok(record)
}

fn verified_record(reply: Frame) -> Result<IdentityRecord, NetError> {
    match reply {
        Frame::Record { record, .. } => {
            // Never trust the relay's word for a key: the id must hash from the key and the
            // prekey must be signed by it.
            record
                .verify()
                .map_err(|e| NetError::Protocol(format!("the relay sent a bad record: {e}")))?;
            Ok(record)
        }
        other => Err(NetError::Protocol(format!("unexpected {}", other.kind()))),
    }
}

fn spawn_reader(
    mut stream: Box<dyn syncra_core::transport::FrameStream>,
    pushes: mpsc::Sender<Push>,
    unread: bool,
    connection: u64,
) -> (Pending, Arc<AtomicBool>, watch::Receiver<bool>) {
    // A push for nobody must not stop the reader (replies come behind it): dropped at once.
    let push = move |p: Push| {
        let pushes = pushes.clone();
        async move {
            if unread {
                let _ = pushes.try_send(p);
            } else {
                let _ = pushes.send(p).await;
            }
        }
    };
    let pending: Pending = Arc::default();
    let closed = Arc::new(AtomicBool::new(false));
    let (ended_tx, ended_rx) = watch::channel(false);
    let p = pending.clone();
    let c = closed.clone();
    tokio::spawn(async move {
        while let Some(Ok(bytes)) = stream.recv().await {
            let Ok(frame) = Frame::decode(&bytes, DEFAULT_MAX_FRAME) else {
                tracing::warn!("ignoring an undecodable frame from the relay");
                continue;
            };
            match frame {
                Frame::Deliver { envelope } => {
                    // If nobody listens for deliveries, dropping them is the caller's choice.
                    push(Push::Deliver(envelope)).await;
                }
                Frame::Pending { entry_id, envelope } => {
                    push(Push::Pending(entry_id, envelope)).await;
                }
                Frame::PendingEnd { count } => {
                    push(Push::BacklogDone { count, connection }).await;
                }
                Frame::Error {
                    request_id: 0,
                    code,
                    message,
                } => push(Push::Notice(code, message)).await,
                Frame::Record { request_id, .. }
                | Frame::Ack { request_id }
                | Frame::KeyPackage { request_id, .. }
                | Frame::KeyPackages { request_id, .. }
                | Frame::SendResult { request_id, .. }
                | Frame::Error { request_id, .. } => {
                    let waiter = p
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&request_id);
                    if let Some(w) = waiter {
                        let _ = w.send(frame);
                    }
                }
                Frame::Pong { .. } | Frame::Ping { .. } | Frame::Challenge { .. } => {}
                other => tracing::debug!("ignoring {} from the relay", other.kind()),
            }
        }
        if let Some(reason) = stream.close_reason()
            && let Some(code) = reason.code
        {
            push(Push::Notice(code, reason.message)).await;
        }
        c.store(true, Ordering::Relaxed);
        // Fail everything still waiting.
        p.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let _ = ended_tx.send(true);
    });
    (pending, closed, ended_rx)
}

fn spawn_pinger(session: std::sync::Weak<Session>) {
    tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            tokio::time::sleep(PING_INTERVAL).await;
            let Some(s) = session.upgrade() else { return };
            if s.is_closed() {
                return;
            }
            n += 1;
            let frame = Frame::Ping { nonce: n }.encode();
            if s.sink.lock().await.send(&[frame]).await.is_err() {
                return;
            }
        }
    });
}

/// The delay before reconnect attempt `attempt` (0-based): exponential from 250 ms up to 30 s,
/// with full jitter so that many clients of a restarted relay do not return at once.
pub fn backoff(attempt: u32) -> Duration {
    syncra_core::time::backoff(attempt, Duration::from_millis(250), Duration::from_secs(30))
}

#[cfg(test)]
mod plaintext_tests {
    use super::*;

    #[test]
    fn plaintext_only_to_loopback_decided_from_the_text() {
        for (url, ok) in [
            ("ws://127.0.0.1:7443/", true),
            ("ws://127.9.8.7/", true),
            ("ws://[::1]:7443/", true),
            ("ws://localhost:7443/", true),
            ("WS://LOCALHOST/", true),
            ("wss://relay.example/", true),
            ("ws://relay.example/", false),
            ("ws://10.0.0.1:7443/", false),
            ("ws://localhost.evil.example/", false),
            ("ws://127.0.0.1.nip.io/", false),
            ("ws://127.0.0.1@relay.example/", false),
            ("ws://[::ffff:127.0.0.1]/", false),
            ("ws://0.0.0.0/", false),
        ] {
            assert_eq!(check_plaintext(url, false).is_ok(), ok, "{url}");
        }
        let e = check_plaintext("ws://relay.example:80/", false).unwrap_err();
        assert!(e.to_string().contains("wss://relay.example/"), "{e}");
        assert!(!e.is_transient());
        assert!(check_plaintext("ws://relay.example/", true).is_ok());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lookup_is_answered_only_by_the_record_asked_for() {
        let record = |handle: &str| {
            let key = IdentityKeyPair::generate();
            let prekey = syncra_core::crypto::keys::PrekeySecret::generate(&key, 1);
            IdentityRecord {
                user_id: key.user_id(),
                handle: syncra_core::Handle::parse(handle).unwrap(),
                identity_key: key.public(),
                prekey: prekey.signed().clone(),
            }
        };
        let answer = |r: IdentityRecord| Frame::Record {
            request_id: 1,
            record: r,
        };
        let bob = record("bob");
        assert_eq!(answer_for_handle("Bob", answer(bob.clone())).unwrap(), bob);
        // A valid record, but for someone else: refused (it would pin eve's key as bob's).
        let err = answer_for_handle("bob", answer(record("eve"))).unwrap_err();
        assert!(
            err.to_string().contains("with the record of \"eve\""),
            "{err}"
        );
        // Another kind of frame where a record was expected: refused.
        assert!(answer_for_handle("bob", Frame::Ack { request_id: 1 }).is_err());
        // A record whose prekey is not signed by its key: refused.
        let mut forged = record("bob");
        forged.prekey.signature[0] ^= 1;
        assert!(answer_for_handle("bob", answer(forged)).is_err());
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 0..40 {
            let d = backoff(attempt);
            assert!(d <= Duration::from_secs(30), "{attempt}: {d:?}");
        }
        assert!(backoff(0) <= Duration::from_millis(250));
        assert!(backoff(10) >= Duration::from_secs(15));
    }
}

/// What checking a relay found (onboarding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// The relay's id from its challenge.
    pub relay_id: String,
    /// Whether the connection was TLS (certificate verified).
    pub tls: bool,
    /// Whether the handle asked about is free.
    pub handle_free: Option<bool>,
}

impl Probe {
    /// One line for the onboarding screen.
    pub fn describe(&self) -> String {
        let security = if self.tls {
            "TLS certificate verified"
        } else {
            "plain WebSocket (only safe on this machine)"
        };
        format!("✓ reachable: relay {:?}, {security}", self.relay_id)
    }
}

/// Connects to a relay without logging in: reads its challenge and, if asked, whether a handle
/// is free (handle lookups are allowed before login).
pub async fn probe(url: &str, handle: Option<&str>, insecure: bool) -> Result<Probe, NetError> {
    check_plaintext(url, insecure)?;
    tokio::time::timeout(CONNECT_TIMEOUT, probe_inner(url, handle))
        .await
        .map_err(|_| NetError::Unreachable("the relay did not answer in time".into()))?
}

async fn probe_inner(url: &str, handle: Option<&str>) -> Result<Probe, NetError> {
    let t = transport(None)?;
    let conn = t
        .connect(url)
        .await
        .map_err(|e| NetError::Unreachable(e.to_string()))?;
    let mut sink = conn.sink;
    let mut stream = conn.stream;
    let mut next = async || -> Result<Frame, NetError> {
        match stream.recv().await {
            Some(Ok(b)) => {
                Frame::decode(&b, DEFAULT_MAX_FRAME).map_err(|e| NetError::Protocol(e.to_string()))
            }
            Some(Err(e)) => Err(NetError::Unreachable(e.to_string())),
            None => Err(NetError::Disconnected),
        }
    };
    let relay_id = match next().await? {
        Frame::Challenge { relay_id, .. } => relay_id,
        other => {
            return Err(NetError::Protocol(format!(
                "this does not look like a Syncra relay (got {})",
                other.kind()
            )));
        }
    };
    let mut handle_free = None;
    if let Some(h) = handle {
        sink.send(&[Frame::LookupHandle {
            request_id: 1,
            handle: h.to_owned(),
        }
        .encode()])
            .await
            .map_err(|e| NetError::Unreachable(e.to_string()))?;
        handle_free = Some(match next().await? {
            Frame::Record { .. } => false,
            Frame::Error {
                code: ErrorCode::NotFound,
                ..
            } => true,
            Frame::Error { code, message, .. } => return Err(NetError::Refused { code, message }),
            other => return Err(NetError::Protocol(format!("unexpected {}", other.kind()))),
        });
    }
    let _ = sink.close(CloseReason::normal("probe done")).await;
    Ok(Probe {
        relay_id,
        tls: url.starts_with("wss://"),
        handle_free,
    })
}

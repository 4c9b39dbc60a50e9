//! One client connection: handshake, authentication, then the request loop.
//!
//! The state machine is small and closed: *unauthenticated* (only `Register`, `Auth`, `Resume`
//! and `Ping` are allowed; each attempt consumes the nonce and a new challenge follows a
//! failure) and *authenticated* (lookups, prekey rotation, sends, pings). Every bad input gets
//! an `Error` frame with its code; the connection is closed only when continuing would be
//! pointless or abusive (too many failed logins, a frame over the size limit, a timeout).

use std::collections::VecDeque;
use std::future::Ready;
use std::net::IpAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::{BoxFuture, Either};
use futures_util::stream::FuturesOrdered;
use syncra_core::carriage::CARRIAGE_VERSION;
use syncra_core::crypto::keys::{SignedPrekey, verify_signature};
use syncra_core::error::{StoreError, TransportError};
use syncra_core::transport::{CloseReason, Connection, FrameSink, FrameStream, Incoming};
use syncra_core::wire::{
    ErrorCode, Frame, NONCE_LEN, RequestId, login_statement, register_statement,
};
use syncra_core::{Handle, IdentityRecord, UserId};
use tracing::{debug, info, warn};

use crate::NodeState;
use crate::delivery::{send, send_locally};
use crate::router::{Next, SessionOutbox, SessionQueue};
use crate::tokens::{TokenError, TokenGrant};

/// Malformed frames tolerated on one connection before it is closed.
const MAX_MALFORMED: u32 = 16;
/// Prekeys dated further ahead than this are refused: a far-future prekey would block every
/// later rotation (rotations must not go back in time).
const MAX_PREKEY_FUTURE_SECS: u64 = 24 * 3600;
/// Requests of one session served at once (see [`read_loop`]).
const MAX_IN_FLIGHT: usize = 32;
/// How long a store call may take before the request fails with `store_unavailable`.
const STORE_TIMEOUT: Duration = Duration::from_secs(5);

/// Counts an error sent to a client, by code.
pub(crate) fn count_error(state: &NodeState, code: ErrorCode) {
    state
        .metrics
        .errors
        .get_or_create(&[("code", code.name())])
        .inc();
}

pub(crate) fn error_frame(
    request_id: RequestId,
    code: ErrorCode,
    message: impl Into<String>,
) -> Bytes {
    Frame::Error {
        request_id,
        code,
        message: message.into(),
    }
    .encode()
}

fn store_code(e: &StoreError) -> ErrorCode {
    match e {
        StoreError::HandleTaken(_) => ErrorCode::HandleTaken,
        StoreError::AlreadyRegistered(_) => ErrorCode::AlreadyRegistered,
        StoreError::NotFound(_) => ErrorCode::NotFound,
        StoreError::Invalid(_) | StoreError::StalePrekey => ErrorCode::BadPrekey,
        StoreError::KeyPackagesFull { .. } | StoreError::BadKeyPackage { .. } => {
            ErrorCode::BadKeyPackage
        }
        _ => ErrorCode::StoreUnavailable,
    }
}

pub(crate) async fn with_store_timeout<T>(
    f: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(STORE_TIMEOUT, f).await {
        Ok(r) => r,
        Err(_) => Err(StoreError::Unavailable(
            "the identity store did not answer in time".into(),
        )),
    }
}

/// Sends frames directly on the sink (before the writer takes it over).
async fn send_now(sink: &mut Box<dyn FrameSink>, frame: Bytes) -> Result<(), TransportError> {
    sink.send(&[frame]).await
}

/// What a receive produced.
enum Received {
    Frame(Frame),
    /// A frame that cannot be served: the request id (0 if unknown), the code, the reason.
    Bad(RequestId, ErrorCode, String),
    Fatal(CloseReason),
    Closed,
}

async fn receive(state: &NodeState, stream: &mut Box<dyn FrameStream>, ip: IpAddr) -> Received {
    received(state, stream.recv().await, ip)
}

/// What the transport handed on, decoded and counted. A plain function, so that the decoded
/// frame (224 bytes) is never part of a session's future while it waits for the next one.
fn received(state: &NodeState, got: Option<Result<Bytes, TransportError>>, ip: IpAddr) -> Received {
    match got {
        None => Received::Closed,
        Some(Err(TransportError::TooLarge { size, max })) => Received::Fatal(CloseReason::error(
            ErrorCode::FrameTooLarge,
            format!("frame of {size} bytes exceeds the {max}-byte limit"),
        )),
        Some(Err(TransportError::Closed(_))) => Received::Closed,
        // Nothing more can be read: closed saying which rule was broken.
        Some(Err(TransportError::Protocol(why))) => {
            Received::Fatal(CloseReason::error(ErrorCode::Malformed, why))
        }
        Some(Err(e)) => Received::Bad(0, ErrorCode::Malformed, e.to_string()),
        Some(Ok(bytes)) => match Frame::decode_owned(bytes, state.config.limits.max_frame) {
            Ok(frame) => {
                if let Frame::Send { .. } = frame {
                    state.metrics.hot.sends_in.inc();
                } else {
                    state
                        .metrics
                        .frames_in
                        .get_or_create(&[("kind", frame.kind())])
                        .inc();
                }
                // Decoded first so a throttled request is answered with its own request id.
                if !state.limits.address_message(ip) {
                    return Received::Bad(
                        request_id_of(&frame),
                        ErrorCode::RateLimited,
                        "too many frames from your address; slow down".into(),
                    );
                }
                Received::Frame(frame)
            }
            Err(e) => {
                // Undecodable frames count against the address budget too.
                let _ = state.limits.address_message(ip);
                Received::Bad(0, ErrorCode::from(&e), e.to_string())
            }
        },
    }
}

fn fresh_challenge(state: &NodeState) -> ([u8; NONCE_LEN], Bytes) {
    let mut nonce = [0u8; NONCE_LEN];
    syncra_core::crypto::fill_random(&mut nonce);
    let frame = Frame::Challenge {
        relay_id: state.config.relay_id.clone(),
        nonce,
        server_time_ms: syncra_core::now_ms(),
        max_frame: state.config.limits.max_frame as u32,
    }
    .encode();
    (nonce, frame)
}

/// An authentication outcome.
enum AuthResult {
    Ok(TokenGrant),
    Failed(ErrorCode, String),
}

fn check_prekey_date(prekey: &SignedPrekey) -> Result<(), String> {
    let now = syncra_core::now_ms() / 1000;
    if prekey.created_at > now + MAX_PREKEY_FUTURE_SECS {
        return Err("the prekey is dated more than a day in the future; check your clock".into());
    }
    Ok(())
}

async fn register(
    state: &NodeState,
    nonce: &[u8; NONCE_LEN],
    handle: String,
    identity_key: [u8; 32],
    prekey: SignedPrekey,
    signature: [u8; 64],
) -> AuthResult {
    let parsed = match Handle::parse(&handle) {
        Ok(h) => h,
        Err(e) => return AuthResult::Failed(ErrorCode::HandleInvalid, e.to_string()),
    };
    let statement = register_statement(
        &state.config.relay_id,
        nonce,
        &handle,
        &identity_key,
        &prekey,
    );
    if verify_signature(&identity_key, &statement, &signature).is_err() {
        return AuthResult::Failed(
            ErrorCode::AuthFailed,
            "the registration proof does not verify with this identity key".into(),
        );
    }
    if let Err(why) = check_prekey_date(&prekey) {
        return AuthResult::Failed(ErrorCode::BadPrekey, why);
    }
    let record = IdentityRecord {
        user_id: UserId::from_identity_key(&identity_key),
        handle: parsed,
        identity_key,
        prekey,
    };
    match with_store_timeout(state.store.register(&record)).await {
        Ok(()) => {
            info!(user = %record.user_id.short(), "registered");
            fresh_login(state, record.user_id).await
        }
        Err(e) => {
            let code = store_code(&e);
            let message = match &e {
                StoreError::HandleTaken(h) => {
                    format!("handle {h:?} is taken; pick another handle")
                }
                _ => e.to_string(),
            };
            AuthResult::Failed(code, message)
        }
    }
}

async fn login(
    state: &NodeState,
    nonce: &[u8; NONCE_LEN],
    user: UserId,
    url: &str,
    signature: [u8; 64],
) -> AuthResult {
    let public_urls = &state.config.auth.public_urls;
    if !public_urls.is_empty() && !public_urls.iter().any(|u| u == url) {
        // Checked before the signature: either way the login fails, and this says why.
        return AuthResult::Failed(
            ErrorCode::AuthFailed,
            format!(
                "this login was signed for {}, which is not an address of this relay; if you \
                 dialled another server, it passed this relay's challenge on",
                syncra_core::text::escape_untrusted(url)
            ),
        );
    }
    let record = match with_store_timeout(state.store.by_id(&user)).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            return AuthResult::Failed(
                ErrorCode::NotFound,
                format!("user {user} is not registered on this relay; register first"),
            );
        }
        Err(e) => return AuthResult::Failed(store_code(&e), e.to_string()),
    };
    let statement = login_statement(&state.config.relay_id, url, nonce, &user);
    if verify_signature(&record.identity_key, &statement, &signature).is_err() {
        return AuthResult::Failed(
            ErrorCode::AuthFailed,
            "the login proof does not verify; the nonce may be stale or the key wrong".into(),
        );
    }
    fresh_login(state, user).await
}

/// A grant for a user who just proved possession of the identity key: the login time is now.
async fn fresh_login(state: &NodeState, user: UserId) -> AuthResult {
    match with_store_timeout(state.store.generation(&user)).await {
        Ok(Some(generation)) => AuthResult::Ok(TokenGrant {
            user,
            auth_time_secs: syncra_core::now_ms() / 1000,
            generation,
        }),
        Ok(None) => AuthResult::Failed(
            ErrorCode::NotFound,
            format!("user {user} is not registered on this relay; register first"),
        ),
        Err(e) => AuthResult::Failed(store_code(&e), e.to_string()),
    }
}

/// A resume: the token must verify, its login must be within the absolute session lifetime,
/// and the user must still be registered under the generation the token names (deleting a
/// user revokes its tokens). The grant keeps the token's login time, so resuming never
/// extends a session's absolute lifetime.
async fn resume(state: &NodeState, token: &str) -> AuthResult {
    let now_ms = syncra_core::now_ms();
    let grant = match state.tokens.verify(token, now_ms) {
        Ok(grant) => grant,
        Err(TokenError::Expired) => {
            return AuthResult::Failed(
                ErrorCode::TokenExpired,
                "the resume token has expired; log in again".into(),
            );
        }
        Err(TokenError::Invalid) => {
            return AuthResult::Failed(
                ErrorCode::TokenInvalid,
                "the resume token is not valid for this relay".into(),
            );
        }
    };
    let lifetime = state.config.auth.session_max_lifetime_secs;
    if (now_ms / 1000).saturating_sub(grant.auth_time_secs) >= lifetime {
        return AuthResult::Failed(
            ErrorCode::TokenExpired,
            format!(
                "the session's last login with the identity key is more than {lifetime} s old; \
                 log in again"
            ),
        );
    }
    match with_store_timeout(state.store.generation(&grant.user)).await {
        Ok(Some(generation)) if generation == grant.generation => AuthResult::Ok(grant),
        Ok(_) => AuthResult::Failed(
            ErrorCode::TokenInvalid,
            "the resume token was revoked (the user was deleted or registered again); log in \
             again"
                .into(),
        ),
        Err(e) => AuthResult::Failed(store_code(&e), e.to_string()),
    }
}

/// A connection past its login: what the session needs of the admission phase.
struct Admitted<'a> {
    sink: Box<dyn FrameSink>,
    stream: Box<dyn FrameStream>,
    ip: IpAddr,
    user: UserId,
    /// The connection's place among its address's connections.
    _slot: crate::limits::ConnectionSlot<'a>,
    /// The encoded `AuthOk`, sent first.
    auth_ok: Bytes,
}

/// Runs one connection to completion, from its transport handshake on.
///
/// The handshake, the login and the admission hooks run in a boxed future of their own, freed
/// once the session starts: a task is as large as its largest state for as long as it runs,
/// and the session's own state is what every idle connection pays for. A plain function
/// returning an `async` block, because an `async fn` keeps its arguments twice in its state.
pub fn serve(
    state: Arc<NodeState>,
    incoming: Incoming,
    pending: tokio::sync::OwnedSemaphorePermit,
) -> impl Future<Output = ()> + Send {
    // One pointer in the task's state instead of the two themselves (64 bytes), which it would
    // keep, moved out or not, for as long as it runs.
    let connection = Box::new((incoming, pending));
    async move {
        let Some(admitted) = Box::pin(admit(&state, *connection)).await else {
            return;
        };
        run(&state, admitted).await;
    }
}

/// The admission phase: the transport handshake and the login, under one budget, and the
/// hooks' verdict. `pending` is the connection's place among the connections not yet logged
/// in, given back once it is. `None` when the connection ended (closed, refused or timed out;
/// counted and answered here).
async fn admit(
    state: &NodeState,
    (incoming, pending): (Incoming, tokio::sync::OwnedSemaphorePermit),
) -> Option<Admitted<'_>> {
    let deadline = tokio::time::Instant::now()
        + Duration::from_secs(state.config.limits.handshake_timeout_secs);
    let handshake = tokio::time::timeout_at(deadline, incoming.handshake).await;
    let Connection {
        mut sink,
        mut stream,
        peer,
    } = handshaken(state, handshake, incoming.addr)?;
    let ip = peer.client_ip();
    let Some(slot) = state.limits.connect(ip) else {
        state.metrics.refuse("too_many_connections");
        return turn_away(
            &mut sink,
            ErrorCode::TooManyConnections,
            "too many connections from your address",
        )
        .await;
    };
    let grant =
        match tokio::time::timeout_at(deadline, authenticate(state, &mut sink, &mut stream, ip))
            .await
        {
            Ok(Some(grant)) => grant,
            Ok(None) => return None,
            Err(_) => {
                state.metrics.refuse("auth_timeout");
                return turn_away(
                    &mut sink,
                    ErrorCode::Timeout,
                    "authentication took too long",
                )
                .await;
            }
        };

    drop(pending);
    let user = grant.user;
    let admit = crate::plugins::admit(&state.hooks, move |h| h.on_connect(&user, ip));
    if let Err(why) = admit.await {
        return turn_away(&mut sink, ErrorCode::HookDenied, why).await;
    }

    // Authenticated: the token goes out first, directly, then the writer owns the sink.
    let auth_ok = match state.tokens.issue(&grant, syncra_core::now_ms()) {
        Ok((token, token_expires_ms)) => Frame::AuthOk {
            user_id: user,
            token,
            token_expires_ms,
        }
        .encode(),
        Err(e) => {
            warn!("cannot issue a resume token: {e:#}");
            return turn_away(&mut sink, ErrorCode::Internal, "internal error").await;
        }
    };
    Some(Admitted {
        sink,
        stream,
        ip,
        user,
        _slot: slot,
        auth_ok,
    })
}

/// Ends the admission phase: the connection is closed with `code` and `why`.
async fn turn_away<'a>(
    sink: &mut Box<dyn FrameSink>,
    code: ErrorCode,
    why: impl Into<String>,
) -> Option<Admitted<'a>> {
    let _ = sink.close(CloseReason::error(code, why)).await;
    None
}

/// The session phase: registered with the router, `AuthOk` sent, then requests and deliveries
/// until either side ends it.
///
/// A plain function returning an `async` block, which uses `admitted` where it lies: an
/// `async fn` would keep its argument and the locals taken out of it, both, for as long as the
/// session lives.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice in its state, for the session's whole life"
)]
fn run<'a>(
    state: &'a NodeState,
    mut admitted: Admitted<'a>,
) -> impl Future<Output = ()> + Send + 'a {
    async move {
        let user = admitted.user;
        let mut outbox = SessionQueue::channel(
            state.router.next_session_id(),
            state.config.limits.queue_capacity,
        );
        if state.mailbox.stores() {
            // Before anything can be queued: every reply may overtake the backlog.
            outbox.begin_backlog();
        }
        let queue = outbox.queue.clone();
        // A first session here: other nodes learn it through the presence announcements, and
        // this waits until they did (see `presence`), so that what they send after this session's
        // `AuthOk` reaches it.
        if state.router.add(user, queue.clone()) && !state.broker.alone() {
            Box::pin(state.presence.held(user)).await;
        }
        state.metrics.sessions.inc();
        debug!(user = %user.short(), session = queue.id, "session started");
        if state.draining.load(std::sync::atomic::Ordering::Acquire) {
            // Logged in while the relay drains: the shutdown already closed the sessions it knew.
            queue.close(CloseReason::error(
                ErrorCode::ShuttingDown,
                "the relay is restarting; reconnect shortly",
            ));
        }
        if Box::pin(send_now(&mut admitted.sink, admitted.auth_ok))
            .await
            .is_ok()
        {
            // The reader and the writer of a session run in one task, side by side: a second task
            // would be a second allocation for as long as the session lives, idle or not. Both are
            // polled until one ends, so a reader waiting for room in a full queue is freed by the
            // writer draining it, as before. The writer ends when the session is asked to close
            // (it flushes what is queued and sends the reason) or the connection is lost: then
            // nothing more is read. The reader ends when the peer closes or breaks the protocol:
            // then the writer flushes and closes.
            let cursor = MailboxCursor::default();
            let reader = read_loop(
                state,
                &mut admitted.stream,
                admitted.ip,
                user,
                &queue,
                &cursor,
            );
            let writer = write_loop(state, admitted.sink, outbox, user, &cursor);
            tokio::pin!(reader, writer);
            let writer_done = tokio::select! {
                biased;
                () = &mut writer => true,
                () = &mut reader => false,
            };
            if !writer_done {
                queue.close(CloseReason::normal("session ended"));
                writer.await;
            }
        }
        state.metrics.sessions.dec();
        // The last session here: announced by the presence task, which reads the router when it
        // gets there, so a session that began meanwhile keeps the user announced.
        if state.router.remove(&user, queue.id) && !state.broker.alone() {
            state.presence.changed(user);
        }
        debug!(user = %user.short(), session = queue.id, "session ended");
    }
}

/// The connection, if its transport handshake succeeded in time; otherwise the failure counted.
fn handshaken(
    state: &NodeState,
    handshake: Result<Result<Connection, TransportError>, tokio::time::error::Elapsed>,
    peer: std::net::SocketAddr,
) -> Option<Connection> {
    match handshake {
        Ok(Ok(conn)) => Some(conn),
        // Connected and closed without a handshake: a TCP health check or a port scan.
        // Counted, never logged above debug.
        Ok(Err(TransportError::Closed(why))) => {
            state.metrics.count_refusal("closed_in_handshake");
            debug!(peer = %peer, "{why}");
            None
        }
        Ok(Err(e)) => {
            state.metrics.refuse("handshake_failed");
            debug!(peer = %peer, "handshake failed: {e}");
            None
        }
        Err(_) => {
            state.metrics.refuse("handshake_timeout");
            None
        }
    }
}

/// The unauthenticated phase. Returns what the session is granted once authenticated, or
/// `None` if the connection ended (closed by the peer, or by us after too many failures).
async fn authenticate(
    state: &NodeState,
    sink: &mut Box<dyn FrameSink>,
    stream: &mut Box<dyn FrameStream>,
    ip: IpAddr,
) -> Option<TokenGrant> {
    let (mut nonce, challenge) = fresh_challenge(state);
    send_now(sink, challenge).await.ok()?;
    let mut failures = 0u32;
    let mut malformed = 0u32;
    loop {
        let frame = match receive(state, stream, ip).await {
            Received::Closed => return None,
            Received::Fatal(reason) => {
                let _ = sink.close(reason).await;
                return None;
            }
            Received::Bad(request_id, code, message) => {
                count_error(state, code);
                malformed += 1;
                if malformed > MAX_MALFORMED {
                    let _ = sink
                        .close(CloseReason::error(code, "too many bad frames"))
                        .await;
                    return None;
                }
                send_now(sink, error_frame(request_id, code, message))
                    .await
                    .ok()?;
                continue;
            }
            Received::Frame(f) => f,
        };
        let result = match frame {
            Frame::Ping { nonce } => {
                send_now(sink, Frame::Pong { nonce }.encode()).await.ok()?;
                continue;
            }
            Frame::Pong { .. } => continue,
            Frame::LookupHandle { request_id, handle } => {
                let reply = if state.limits.lookup_attempt(ip) {
                    lookup_handle(state, request_id, &handle).await
                } else {
                    count_error(state, ErrorCode::RateLimited);
                    error_frame(
                        request_id,
                        ErrorCode::RateLimited,
                        "too many handle lookups from your address before logging in; wait a \
                         minute or log in",
                    )
                };
                send_now(sink, reply).await.ok()?;
                continue;
            }
            Frame::Register { .. } | Frame::Auth { .. } | Frame::Resume { .. }
                if !state.limits.auth_attempt(ip) =>
            {
                AuthResult::Failed(
                    ErrorCode::RateLimited,
                    "too many authentication attempts from your address; wait a minute".into(),
                )
            }
            Frame::Register {
                handle,
                identity_key,
                prekey,
                signature,
            } => register(state, &nonce, handle, identity_key, prekey, signature).await,
            Frame::Auth {
                user_id,
                url,
                signature,
            } => login(state, &nonce, user_id, &url, signature).await,
            Frame::Resume { token } => resume(state, &token).await,
            other => {
                let (code, message) = if is_client_frame(&other) {
                    (
                        ErrorCode::NotAuthenticated,
                        format!(
                            "{} needs an authenticated session; log in first",
                            other.kind()
                        ),
                    )
                } else {
                    (
                        ErrorCode::Unexpected,
                        format!("{} is not something a client sends", other.kind()),
                    )
                };
                count_error(state, code);
                send_now(sink, error_frame(request_id_of(&other), code, message))
                    .await
                    .ok()?;
                continue;
            }
        };
        match result {
            AuthResult::Ok(grant) => return Some(grant),
            AuthResult::Failed(code, message) => {
                count_error(state, code);
                failures += 1;
                if failures >= state.config.auth.max_attempts_per_connection {
                    let _ = sink.close(CloseReason::error(code, message)).await;
                    return None;
                }
                send_now(sink, error_frame(0, code, message)).await.ok()?;
                // Every attempt consumes the nonce: a new challenge for the next one.
                let (next, challenge) = fresh_challenge(state);
                nonce = next;
                send_now(sink, challenge).await.ok()?;
            }
        }
    }
}

fn is_client_frame(f: &Frame) -> bool {
    matches!(
        f,
        Frame::Register { .. }
            | Frame::Auth { .. }
            | Frame::Resume { .. }
            | Frame::LookupHandle { .. }
            | Frame::LookupId { .. }
            | Frame::RotatePrekey { .. }
            | Frame::Send { .. }
            | Frame::Acknowledge { .. }
            | Frame::ClearMailbox { .. }
            | Frame::PublishKeyPackages { .. }
            | Frame::ClaimKeyPackage { .. }
            | Frame::Ping { .. }
            | Frame::Pong { .. }
    )
}

fn request_id_of(f: &Frame) -> RequestId {
    match f {
        Frame::LookupHandle { request_id, .. }
        | Frame::LookupId { request_id, .. }
        | Frame::RotatePrekey { request_id, .. }
        | Frame::ClearMailbox { request_id }
        | Frame::PublishKeyPackages { request_id, .. }
        | Frame::ClaimKeyPackage { request_id, .. }
        | Frame::Send { request_id, .. } => *request_id,
        _ => 0,
    }
}

/// The authenticated phase: requests until the connection ends. A session closed from
/// elsewhere (the node's idle sweep, shutdown, overflow policy, a lost connection) ends when
/// its writer does: [`serve`] stops reading then.
///
/// Up to [`MAX_IN_FLIGHT`] requests of a session are served at once, so a send that waits for
/// the broker does not hold up the next one; answers still leave in request order (a
/// `FuturesOrdered`), as `docs/PROTOCOL.md` §2.2 promises. Each request is polled once as soon
/// as it is read, before the next frame is read: a send's local deliveries and its hand-over
/// to the broker happen in that first poll, so a sender's messages reach every recipient in
/// the order they were sent. With relay hooks configured, requests are served one at a time
/// (a hook may delay a message, and a later one must not overtake it).
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice in its state, for the session's whole life"
)]
fn read_loop<'a>(
    state: &'a NodeState,
    stream: &'a mut Box<dyn FrameStream>,
    ip: IpAddr,
    user: UserId,
    queue: &'a SessionQueue,
    cursor: &'a MailboxCursor,
) -> impl Future<Output = ()> + Send + 'a {
    async move {
        let in_flight_max = if state.hooks.is_empty() {
            MAX_IN_FLIGHT
        } else {
            1
        };
        let mut in_flight = InFlight(None);
        let mut malformed = 0u32;
        loop {
            // Decided in a plain function, so that the frame is gone before anything is awaited:
            // a frame is 224 bytes, and whatever lives across an await is part of this task's
            // memory for the session's whole life, idle or not.
            let step = {
                let received = tokio::select! {
                    biased;
                    Some(reply) = in_flight.next(), if !in_flight.is_empty() => {
                        if !answer(queue, reply).await {
                            return;
                        }
                        continue;
                    }
                    // `FrameStream::recv` is cancel-safe, so losing this race loses nothing.
                    got = stream.recv(), if in_flight.len() < in_flight_max => received(state, got, ip),
                };
                // Not idle: the node's sweep closes a session that sends nothing for the idle
                // timeout (`idle_sweep` in lib.rs), so no session holds a timer of its own.
                queue.heard(state.router.sweep());
                classify(state, user, queue, cursor, received, &mut malformed)
            };
            let (mut request, ordered) = match step {
                Step::End => return,
                // Known at once, nothing ahead of it: answered without a boxed future.
                Step::Answer(reply) if in_flight.is_empty() => {
                    if !answer(queue, Some(reply)).await {
                        return;
                    }
                    continue;
                }
                Step::Answer(reply) => {
                    in_flight.push_back(Box::pin(std::future::ready(Some(reply))));
                    continue;
                }
                Step::Serve(request, ordered) => (request, ordered),
            };
            if ordered {
                // A carriage still to be checked (a commit, or a group this node must read) starts
                // only once what the session sent before it is delivered or stored: a commit never
                // overtakes an earlier message of its sender in a member's mailbox. (The waits for
                // it are boxed: they are rare, and a session's task is as large as its largest.)
                if !Box::pin(in_flight.answer_all(queue)).await {
                    return;
                }
            }
            let first = std::future::poll_fn(|cx| Poll::Ready(request.as_mut().poll(cx))).await;
            match first {
                // Nothing ahead of it: answer at once (the common case, and the cheapest).
                Poll::Ready(reply) if in_flight.is_empty() => {
                    if !answer(queue, reply).await {
                        return;
                    }
                }
                Poll::Ready(reply) => in_flight.push_back(Box::pin(std::future::ready(reply))),
                Poll::Pending => in_flight.push_back(request),
            }
            if ordered && !Box::pin(in_flight.answer_all(queue)).await {
                return;
            }
        }
    }
}

/// A session's requests being served, answered in the order they came. The set exists only
/// while a request waits: an empty `FuturesOrdered` still holds an allocation (its queue of
/// ready futures), and most sessions have nothing in flight most of the time. Boxed as well:
/// the set is 64 bytes, which the session's task would otherwise keep while it has none.
struct InFlight<'a>(Option<Box<FuturesOrdered<BoxFuture<'a, Option<Bytes>>>>>);

impl<'a> InFlight<'a> {
    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|set| set.is_empty())
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |set| set.len())
    }

    fn push_back(&mut self, request: BoxFuture<'a, Option<Bytes>>) {
        self.0
            .get_or_insert_with(|| Box::new(FuturesOrdered::new()))
            .push_back(request);
    }

    /// Waits for every request in flight and queues their answers in order. False when the
    /// session is gone.
    async fn answer_all(&mut self, queue: &SessionQueue) -> bool {
        while let Some(reply) = self.next().await {
            if !answer(queue, reply).await {
                return false;
            }
        }
        true
    }

    /// The next answer in order; `None` when nothing is in flight.
    async fn next(&mut self) -> Option<Option<Bytes>> {
        let set = self.0.as_mut()?;
        let answer = set.next().await;
        if set.is_empty() {
            self.0 = None;
        }
        answer
    }
}

/// What the read loop does with what it received, decided without waiting.
enum Step<'a> {
    /// The session is over.
    End,
    /// An answer known at once (a send routed on the spot, or an error).
    Answer(Bytes),
    /// A request to serve, and whether the next frame waits for it (a carriage not routed yet).
    Serve(BoxFuture<'a, Option<Bytes>>, bool),
}

/// Decides what to do with `received`: a send is routed on the spot (local sessions, and the
/// hand-over to the broker for other nodes) and its answer returned when already known. An
/// MLS carriage whose group must be read from the store (or a commit, which claims its epoch
/// there) is routed only after that round trip: what the session sends after it must not be
/// routed before it (a message after its sender's commit would meet the old epoch), so the
/// loop waits for it before the next frame is read. One checked against a group the node
/// knows is routed on the spot like an envelope.
fn classify<'a>(
    state: &'a NodeState,
    user: UserId,
    queue: &'a SessionQueue,
    cursor: &'a MailboxCursor,
    received: Received,
    malformed: &mut u32,
) -> Step<'a> {
    match received {
        Received::Closed => Step::End,
        Received::Fatal(reason) => {
            queue.close(reason);
            Step::End
        }
        Received::Bad(request_id, code, message) => {
            count_error(state, code);
            *malformed += 1;
            if *malformed > MAX_MALFORMED {
                queue.close(CloseReason::error(code, "too many bad frames"));
                return Step::End;
            }
            Step::Answer(error_frame(request_id, code, message))
        }
        Received::Frame(frame) => match start_request(state, user, queue, cursor, frame) {
            Ok(reply) => Step::Answer(reply),
            Err((request, ordered)) => Step::Serve(request, ordered),
        },
    }
}

/// Starts serving one request: its answer if it is known at once (a send routed on the spot),
/// or the future that serves it and whether the next frame must wait for it (a send not
/// routed yet: [`send_locally`]).
fn start_request<'a>(
    state: &'a NodeState,
    user: UserId,
    queue: &'a SessionQueue,
    cursor: &'a MailboxCursor,
    frame: Frame,
) -> Result<Bytes, (BoxFuture<'a, Option<Bytes>>, bool)> {
    match frame {
        Frame::Send {
            request_id,
            envelope,
        } if state.hooks.is_empty() => send_locally(state, user, request_id, &envelope),
        // A ping is also when entries stored since the login's backlog are picked up.
        Frame::Ping { nonce } if state.mailbox.stores() => Err((
            Box::pin(pending_then_pong(state, user, queue, cursor, nonce)),
            false,
        )),
        Frame::Acknowledge { entry_id } => {
            Err((Box::pin(acknowledge(state, user, cursor, entry_id)), false))
        }
        other => {
            // With relay hooks a carriage is checked and routed in its future (and requests
            // are served one at a time anyway).
            let ordered = matches!(
                &other,
                Frame::Send { envelope, .. } if envelope.first() == Some(&CARRIAGE_VERSION)
            );
            Err((Box::pin(handle_request(state, user, other)), ordered))
        }
    }
}

/// Queues a request's answer, if it has one. False when the session is gone.
///
/// Not an `async fn`: the common case — room in the queue — is decided on the spot, and only
/// a full queue (the client reads slowly) makes a boxed wait for room, so neither the wait nor
/// the reply is part of every session's task, which is as large as its largest await.
fn answer(queue: &SessionQueue, reply: Option<Bytes>) -> Either<Ready<bool>, BoxFuture<'_, bool>> {
    match reply.map(|reply| queue.try_reply(reply)) {
        None | Some(Ok(())) => Either::Left(std::future::ready(true)),
        Some(Err(Some(reply))) => Either::Right(Box::pin(queue.reply(reply))),
        Some(Err(None)) => Either::Left(std::future::ready(false)),
    }
}

async fn handle_request(state: &NodeState, user: UserId, frame: Frame) -> Option<Bytes> {
    let fail = |request_id: RequestId, code: ErrorCode, message: String| {
        count_error(state, code);
        Some(error_frame(request_id, code, message))
    };
    match frame {
        Frame::Ping { nonce } => Some(Frame::Pong { nonce }.encode()),
        Frame::Pong { .. } => None,
        Frame::LookupHandle { request_id, handle } => {
            Some(lookup_handle(state, request_id, &handle).await)
        }
        Frame::LookupId {
            request_id,
            user_id,
        } => match with_store_timeout(state.store.by_id(&user_id)).await {
            Ok(Some(record)) => Some(Frame::Record { request_id, record }.encode()),
            Ok(None) => fail(
                request_id,
                ErrorCode::NotFound,
                format!("user {user_id} is not registered"),
            ),
            Err(e) => fail(request_id, store_code(&e), e.to_string()),
        },
        Frame::RotatePrekey { request_id, prekey } => {
            if let Err(why) = check_prekey_date(&prekey) {
                return fail(request_id, ErrorCode::BadPrekey, why);
            }
            match with_store_timeout(state.store.replace_prekey(&user, &prekey)).await {
                Ok(()) => Some(Frame::Ack { request_id }.encode()),
                Err(e) => fail(request_id, store_code(&e), e.to_string()),
            }
        }
        Frame::Send {
            request_id,
            envelope,
        } => Some(send(state, user, request_id, envelope).await),
        // Served by `acknowledge` (coalesced per session) before requests get here.
        Frame::Acknowledge { .. } => None,
        Frame::ClearMailbox { request_id } => match state.mailbox.clear(&user).await {
            Ok(_) => Some(Frame::Ack { request_id }.encode()),
            Err(e) => {
                state.metrics.mailbox_failure(&e);
                fail(request_id, ErrorCode::MailboxUnavailable, e.to_string())
            }
        },
        Frame::PublishKeyPackages {
            request_id,
            last_resort,
            one_time,
        } => match with_store_timeout(state.store.publish_key_packages(
            &user,
            &one_time,
            last_resort.as_ref(),
        ))
        .await
        {
            Ok(stock) => Some(
                Frame::KeyPackages {
                    request_id,
                    one_time: stock.one_time,
                    last_resort: stock.last_resort,
                }
                .encode(),
            ),
            Err(e) => fail(request_id, store_code(&e), e.to_string()),
        },
        Frame::ClaimKeyPackage {
            request_id,
            user_id,
        } => match with_store_timeout(state.store.claim_key_package(&user_id)).await {
            Ok(Some(claimed)) => Some(
                Frame::KeyPackage {
                    request_id,
                    user_id,
                    last_resort: claimed.last_resort,
                    package: claimed.package,
                }
                .encode(),
            ),
            Ok(None) => fail(
                request_id,
                ErrorCode::NotFound,
                format!("user {user_id} has no KeyPackage published"),
            ),
            Err(e) => fail(request_id, store_code(&e), e.to_string()),
        },
        Frame::Register { .. } | Frame::Auth { .. } | Frame::Resume { .. } => fail(
            0,
            ErrorCode::AlreadyAuthenticated,
            "this session is already authenticated".into(),
        ),
        other => fail(
            request_id_of(&other),
            ErrorCode::Unexpected,
            format!("{} is not something a client sends", other.kind()),
        ),
    }
}

/// Answers a handle lookup. Allowed before login too, so a new user can see whether a handle
/// is free before registering; the handle directory is public to every registered user anyway,
/// and the per-address frame limit bounds enumeration.
async fn lookup_handle(state: &NodeState, request_id: RequestId, handle: &str) -> Bytes {
    let (code, message) = match Handle::parse(handle) {
        Err(e) => (ErrorCode::HandleInvalid, e.to_string()),
        Ok(handle) => match with_store_timeout(state.store.by_handle(&handle)).await {
            Ok(Some(record)) => return Frame::Record { request_id, record }.encode(),
            Ok(None) => (
                ErrorCode::NotFound,
                format!("nobody is registered as {handle:?}"),
            ),
            Err(e) => (store_code(&e), e.to_string()),
        },
    };
    count_error(state, code);
    error_frame(request_id, code, message)
}

/// Entries of the user's mailbox read per query.
const MAILBOX_PAGE: usize = 256;

/// How far a session has read its user's mailbox: entries up to `after` were sent to it. Set by
/// the writer's login backlog, then by the checks that pings trigger.
#[derive(Debug, Default)]
pub(crate) struct MailboxCursor {
    after: std::sync::atomic::AtomicU64,
    /// Set once the login backlog was sent; checks before that would send entries twice.
    backlog_sent: std::sync::atomic::AtomicBool,
    /// The highest entry id the client acknowledged.
    acked: std::sync::atomic::AtomicU64,
    /// Held by the one acknowledgement of this session that is with the mailbox; the value is
    /// the highest id the mailbox has deleted up to for this session.
    acking: tokio::sync::Mutex<u64>,
}

/// Acknowledges the user's mailbox entries up to `entry_id`, coalesced per session.
///
/// Why: a client acknowledges every entry of its backlog as it files it, so draining 10 000
/// entries sends 10 000 acknowledgements; one mailbox call each is one database transaction or
/// one JetStream purge each, which held a Postgres drain for minutes and flooded a NATS server
/// until reads timed out. Acknowledgements are cumulative, so only the highest matters: one
/// acknowledgement at a time talks to the mailbox, and those that arrive meanwhile only raise
/// the id it deletes up to next. The one talking looks again after every call and before it
/// finishes, so no id is left behind, and since answers leave in request order, a `Pong` after
/// an acknowledgement still means that it was processed. No reply: an entry that stays because
/// the mailbox failed is sent again later, and a client shows a message id once.
async fn acknowledge(
    state: &NodeState,
    user: UserId,
    cursor: &MailboxCursor,
    entry_id: u64,
) -> Option<Bytes> {
    use std::sync::atomic::Ordering;
    cursor.acked.fetch_max(entry_id, Ordering::AcqRel);
    loop {
        // Another acknowledgement of this session is with the mailbox: it takes this id too.
        let Ok(mut told) = cursor.acking.try_lock() else {
            return None;
        };
        loop {
            let target = cursor.acked.load(Ordering::Acquire);
            if target <= *told {
                break;
            }
            if let Err(e) = state.mailbox.ack(&user, target).await {
                state.metrics.mailbox_failure(&e);
                return None;
            }
            *told = target;
        }
        let done = *told;
        drop(told);
        // An acknowledgement that arrived between the last look and the unlock found the lock
        // taken and left its id to us.
        if cursor.acked.load(Ordering::Acquire) <= done {
            return None;
        }
    }
}

/// Reads the user's mailbox after the cursor, a page at a time, as `Pending` frames.
async fn next_pending(
    state: &NodeState,
    user: &UserId,
    cursor: &MailboxCursor,
) -> Result<Vec<Bytes>, syncra_core::mailbox::MailboxError> {
    use std::sync::atomic::Ordering;
    let after = cursor.after.load(Ordering::Acquire);
    let entries = state
        .mailbox
        .take(user, after, MAILBOX_PAGE, syncra_core::now_ms())
        .await?;
    if let Some(last) = entries.last() {
        cursor.after.store(last.id, Ordering::Release);
    }
    state.metrics.mailbox_out.inc_by(entries.len() as u64);
    Ok(entries
        .into_iter()
        .map(|e| {
            Frame::Pending {
                entry_id: e.id,
                envelope: e.delivery,
            }
            .encode()
        })
        .collect())
}

/// The login backlog: every entry of the user's mailbox, in order, then `PendingEnd`. Runs in
/// the writer before it drains the session's queue, so the backlog arrives before any live
/// delivery (which waits in the queue meanwhile).
///
/// Replies do not wait for it (`docs/PROTOCOL.md` §2.6): before every `write_batch` frames of
/// the backlog, the replies queued so far are written. A backlog is up to 10 000 entries,
/// written as fast as the client reads them, and a reconnecting client asks things meanwhile
/// (lookups, sends, KeyPackages): behind the whole backlog its requests timed out, and once
/// their replies filled the queue its reader stopped and live deliveries to it were refused.
/// Replies may go first because none depends on the backlog: the client matches them by
/// request id, an acknowledgement has no reply, and what a `Pong` vouches for (the requests
/// before it were served) holds whatever comes between. Replies queued after the last look stay
/// queued and follow `PendingEnd`, which keeps the `Pending` frames a ping picks up once the
/// backlog is sent behind it.
async fn send_backlog(
    state: &NodeState,
    sink: &mut Box<dyn FrameSink>,
    outbox: &mut SessionOutbox,
    user: &UserId,
    cursor: &MailboxCursor,
) -> Result<(), TransportError> {
    let batch_max = state.config.limits.write_batch;
    let mut replies = VecDeque::new();
    let mut count = 0u32;
    loop {
        match next_pending(state, user, cursor).await {
            Ok(frames) if frames.is_empty() => break,
            Ok(frames) => {
                count = count.saturating_add(frames.len() as u32);
                let last_page = frames.len() < MAILBOX_PAGE;
                for part in frames.chunks(batch_max) {
                    outbox.take_replies(&mut replies);
                    if !replies.is_empty() {
                        write_batch(state, sink, &mut replies, batch_max).await?;
                    }
                    sink.send(part).await?;
                }
                if last_page {
                    break;
                }
            }
            Err(e) => {
                // What was not sent stays in the mailbox for the next check or login.
                state.metrics.mailbox_failure(&e);
                break;
            }
        }
    }
    cursor
        .backlog_sent
        .store(true, std::sync::atomic::Ordering::Release);
    sink.send(&[Frame::PendingEnd { count }.encode()]).await?;
    outbox.end_backlog();
    Ok(())
}

/// Answers a ping, first sending what was stored for the user since the last check (an entry
/// stored in the instant the user logged in on another node lands in the mailbox after the
/// login's backlog was read; the client's next ping picks it up).
async fn pending_then_pong(
    state: &NodeState,
    user: UserId,
    queue: &SessionQueue,
    cursor: &MailboxCursor,
    nonce: u64,
) -> Option<Bytes> {
    if cursor
        .backlog_sent
        .load(std::sync::atomic::Ordering::Acquire)
    {
        match next_pending(state, &user, cursor).await {
            Ok(frames) => {
                for frame in frames {
                    if !queue.reply(frame).await {
                        return None;
                    }
                }
            }
            Err(e) => state.metrics.mailbox_failure(&e),
        }
    }
    Some(Frame::Pong { nonce }.encode())
}

/// Drains a session's queue onto the connection in batches until it is closed, after sending
/// the user's mailbox backlog.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice in its state, for the session's whole life"
)]
fn write_loop<'a>(
    state: &'a NodeState,
    mut sink: Box<dyn FrameSink>,
    mut outbox: SessionOutbox,
    user: UserId,
    cursor: &'a MailboxCursor,
) -> impl Future<Output = ()> + Send + 'a {
    async move {
        // Boxed: the backlog's state is needed once, and a task is as large as its largest await.
        // A relay without a mailbox ends an empty backlog all the same, so a client knows at
        // once that nothing is held (docs/PROTOCOL.md §2.3).
        let backlog = if state.mailbox.stores() {
            Box::pin(send_backlog(state, &mut sink, &mut outbox, &user, cursor)).await
        } else {
            sink.send(&[Frame::PendingEnd { count: 0 }.encode()]).await
        };
        if backlog.is_err() {
            outbox.queue.close(CloseReason::normal("connection lost"));
            return;
        }
        let batch_max = state.config.limits.write_batch;
        // Swapped with the queue's buffer, so steady traffic allocates nothing; both are given back
        // whenever the queue runs empty (an idle session holds neither).
        let mut batch: VecDeque<Bytes> = VecDeque::new();
        let queue = outbox.queue.clone();
        let reason = loop {
            match outbox.next_batch(&mut batch).await {
                Next::Batch => {
                    let dropped = queue.take_dropped();
                    if dropped > 0 {
                        state.metrics.queue_overflow.inc_by(dropped);
                        batch.push_back(error_frame(
                        0,
                        ErrorCode::QueueOverflow,
                        format!(
                            "{dropped} messages were refused because this session could not keep up"
                        ),
                    ));
                    }
                    if write_batch(state, &mut sink, &mut batch, batch_max)
                        .await
                        .is_err()
                    {
                        queue.close(CloseReason::normal("connection lost"));
                        return;
                    }
                }
                Next::Closed(reason) => break reason,
                Next::Shut => break CloseReason::normal("session ended"),
            }
        };
        // Flush what is already queued (a draining shutdown must not lose accepted deliveries),
        // then say why we close.
        outbox.shut();
        while outbox.next_batch(&mut batch).await == Next::Batch {
            if write_batch(state, &mut sink, &mut batch, batch_max)
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = sink.close(reason).await;
    }
}

/// Writes `batch` in writes of at most `batch_max` frames, and empties it.
async fn write_batch(
    state: &NodeState,
    sink: &mut Box<dyn FrameSink>,
    batch: &mut VecDeque<Bytes>,
    batch_max: usize,
) -> Result<(), TransportError> {
    state.metrics.frames_out.inc_by(batch.len() as u64);
    for frames in batch.make_contiguous().chunks(batch_max) {
        state.metrics.write_batches.inc();
        sink.send(frames).await?;
    }
    batch.clear();
    Ok(())
}

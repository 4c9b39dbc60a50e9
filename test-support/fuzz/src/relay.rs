//! `relay_session`: a real relay in this process, driven over its WebSocket by a sequence of
//! actions derived from the fuzz input with `arbitrary`.
//!
//! One relay (SQLite store, in-process broker, WebSocket on 127.0.0.1) lives in a `static` for
//! the whole fuzzing run; starting one per input would cost more than the input. Each input
//! opens up to two connections, plays its actions (fuzzed frames of every kind, raw bytes,
//! oversized frames, and valid logins, registrations, resumes, prekey rotations and sends that
//! the harness signs for the current challenge, so the authenticated states are reachable),
//! then checks:
//!
//! - every frame the relay sends decodes;
//! - `AuthOk` comes only on a connection where the harness sent a valid proof for that user
//!   (anything else is an authentication bypass);
//! - a `Deliver` comes only to an authenticated session, and its envelope's header names that
//!   session's user;
//! - every open connection still answers a ping, and after the input a fresh connection gets
//!   its challenge and a `Pong` (the relay is alive, accepting, and has not leaked the
//!   connection slots of earlier inputs).
//!
//! A panic anywhere (a relay task included) aborts the process: libfuzzer-sys installs a panic
//! hook that aborts before unwinding, so tokio cannot swallow it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use rand::SeedableRng;
use syncra_core::crypto::envelope::{Recipient, parse_header, seal};
use syncra_core::crypto::keys::{IdentityKeyPair, PrekeySecret, SignedPrekey};
use syncra_core::transport::{CloseReason, FrameSink, Transport};
use syncra_core::wire::{
    ErrorCode, Frame, NONCE_LEN, Outcome, RecipientOutcome, login_statement, register_statement,
};
use syncra_core::{Handle, IdentityRecord, UserId};
use syncra_relay::{Relay, RelayConfig};
use syncra_transport_ws::{WsConfig, WsTransport};
use tokio::sync::watch;

pub use crate::actions::*;

/// How long the harness waits for the relay to answer before calling it hung.
pub const DEADLINE: Duration = Duration::from_secs(10);
/// The relay's frame limit in the harness (small, so oversized frames are cheap to send).
pub const MAX_FRAME: usize = 64 * 1024;
/// Actions played per input; the rest of a longer input is ignored.
pub const MAX_ACTIONS: usize = 48;
/// Pings the harness sends carry this bit; fuzzed pings never do, so their pongs cannot be
/// mistaken for the harness's.
const HARNESS_PING: u64 = 1 << 63;
/// The relay id in the harness.
pub const RELAY_ID: &str = "syncra-fuzz";
/// The URL every login of the harness signs (the relay under fuzz lists no public URLs, so
/// any URL is accepted as long as the signature covers it).
pub const FUZZ_URL: &str = "ws://127.0.0.1/";

/// A test identity with its registered record.
pub struct User {
    /// Identity.
    pub identity: IdentityKeyPair,
    /// Current prekey.
    pub prekey: PrekeySecret,
    /// Handle.
    pub handle: String,
}

impl User {
    fn new(seed: u8, handle: &str) -> User {
        let identity = IdentityKeyPair::from_seed(&[seed; 32]);
        let prekey = PrekeySecret::generate_with(
            &identity,
            syncra_core::now_ms() / 1000,
            &mut crate::seeded(u64::from(seed)),
        );
        User {
            identity,
            prekey,
            handle: handle.into(),
        }
    }

    fn id(&self) -> UserId {
        self.identity.user_id()
    }

    fn recipient(&self) -> Recipient {
        Recipient {
            user_id: self.id(),
            prekey: *self.prekey.public(),
        }
    }

    fn register_frame(&self, handle: &str, nonce: &[u8; NONCE_LEN]) -> Frame {
        let prekey = self.prekey.signed().clone();
        let identity_key = self.identity.public();
        let statement = register_statement(RELAY_ID, nonce, handle, &identity_key, &prekey);
        Frame::Register {
            handle: handle.into(),
            identity_key,
            prekey,
            signature: self.identity.sign(&statement),
        }
    }

    fn auth_frame(&self, nonce: &[u8; NONCE_LEN]) -> Frame {
        let statement = login_statement(RELAY_ID, FUZZ_URL, nonce, &self.id());
        Frame::Auth {
            user_id: self.id(),
            url: FUZZ_URL.into(),
            signature: self.identity.sign(&statement),
        }
    }
}

/// What the reader task of a connection has seen.
#[derive(Clone, Debug, Default)]
struct View {
    nonce: [u8; NONCE_LEN],
    previous_nonce: [u8; NONCE_LEN],
    challenges: u64,
    last_pong: u64,
    closed: Option<Option<CloseReason>>,
    authed: Option<UserId>,
    token: Option<String>,
}

/// One client connection with a reader task that checks everything the relay sends.
struct Conn {
    sink: Box<dyn FrameSink>,
    view: watch::Receiver<View>,
    /// Users the harness sent a valid proof (or token) for on this connection.
    proofs: Arc<Mutex<HashSet<UserId>>>,
    reader: tokio::task::JoinHandle<()>,
    pings: u64,
    dead: bool,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn check_frame(frame: &Frame, view: &mut View, proofs: &Mutex<HashSet<UserId>>) {
    match frame {
        Frame::Challenge { nonce, .. } => {
            view.previous_nonce = view.nonce;
            view.nonce = *nonce;
            view.challenges += 1;
        }
        Frame::Pong { nonce } if nonce & HARNESS_PING != 0 => {
            view.last_pong = view.last_pong.max(*nonce & !HARNESS_PING);
        }
        Frame::AuthOk { user_id, token, .. } => {
            let allowed = proofs.lock().expect("proofs").contains(user_id);
            assert!(
                allowed,
                "AUTHENTICATION BYPASS: the relay sent auth_ok for {user_id} on a connection \
                 where no valid proof for that user was sent"
            );
            assert!(
                view.authed.is_none(),
                "the relay sent a second auth_ok on one connection"
            );
            view.authed = Some(*user_id);
            view.token = Some(token.clone());
        }
        Frame::Deliver { envelope } => {
            let user = view
                .authed
                .expect("the relay delivered an envelope to an unauthenticated connection");
            let header = parse_header(envelope)
                .expect("the relay delivered an envelope whose header does not parse");
            assert!(
                header.recipients.iter().any(|r| r.user_id == user),
                "the relay delivered an envelope to {user}, who is not among its recipients"
            );
        }
        _ => {}
    }
}

impl Conn {
    async fn open(url: &str) -> Conn {
        let transport = WsTransport::new(WsConfig {
            max_frame: 4 * MAX_FRAME,
            ..WsConfig::default()
        })
        .expect("client transport");
        let conn = tokio::time::timeout(DEADLINE, transport.connect(url))
            .await
            .expect("the relay accepts a connection within the deadline")
            .expect("the relay accepts a connection");
        let (tx, view) = watch::channel(View::default());
        let proofs = Arc::new(Mutex::new(HashSet::new()));
        let mut stream = conn.stream;
        let reader_proofs = proofs.clone();
        let reader = tokio::spawn(async move {
            loop {
                match stream.recv().await {
                    Some(Ok(bytes)) => {
                        let frame = Frame::decode(&bytes, usize::MAX)
                            .unwrap_or_else(|e| panic!("the relay sent an undecodable frame: {e}"));
                        tx.send_modify(|v| check_frame(&frame, v, &reader_proofs));
                    }
                    Some(Err(_)) | None => {
                        let reason = stream.close_reason();
                        tx.send_modify(|v| v.closed = Some(reason));
                        return;
                    }
                }
            }
        });
        let mut c = Conn {
            sink: conn.sink,
            view,
            proofs,
            reader,
            pings: 0,
            dead: false,
        };
        let got = tokio::time::timeout(
            DEADLINE,
            c.view.wait_for(|v| v.challenges > 0 || v.closed.is_some()),
        )
        .await
        .expect("the relay sends a challenge within the deadline")
        .map(|v| v.clone());
        if let Ok(v) = got
            && v.challenges == 0
        {
            // Refused at once (for example too many connections): the caller decides.
            c.dead = true;
        }
        c
    }

    async fn send(&mut self, frame: Bytes) {
        if self.dead {
            return;
        }
        if self.sink.send(&[frame]).await.is_err() {
            self.dead = true;
        }
    }

    /// Pings and waits for the pong (or the close). Panics if the relay does neither in time.
    async fn sync(&mut self) -> View {
        if !self.dead {
            self.pings += 1;
            let n = self.pings;
            self.send(
                Frame::Ping {
                    nonce: HARNESS_PING | n,
                }
                .encode(),
            )
            .await;
            let waited = tokio::time::timeout(
                DEADLINE,
                self.view
                    .wait_for(|v| v.last_pong >= n || v.closed.is_some()),
            )
            .await;
            match waited {
                Err(_) => panic!(
                    "RELAY HUNG: no pong (and no close) within {DEADLINE:?} on an open connection"
                ),
                Ok(Ok(v)) if v.closed.is_some() => self.dead = true,
                Ok(_) => {}
            }
        }
        self.view.borrow().clone()
    }

    fn allow(&self, user: UserId) {
        self.proofs.lock().expect("proofs").insert(user);
    }
}

/// The relay and the fixed users.
pub struct Harness {
    rt: tokio::runtime::Runtime,
    url: String,
    alice: User,
    bob: User,
    carol: User,
    alice_token: String,
    _relay: Relay,
}

fn harness_config(data_dir: std::path::PathBuf) -> RelayConfig {
    let mut config = RelayConfig {
        relay_id: RELAY_ID.into(),
        data_dir,
        listen: "127.0.0.1:0".into(),
        admin_listen: String::new(),
        log: "off".into(),
        ..RelayConfig::default()
    };
    config.limits.max_frame = MAX_FRAME;
    // Rate limits would turn every later input into `rate_limited`: lift them. The connection
    // limit stays finite so that a leaked connection slot shows up as a refused probe.
    config.limits.messages_per_second_per_user = 1_000_000;
    config.limits.message_burst_per_user = 1_000_000;
    config.limits.messages_per_second_per_address = 1_000_000;
    config.limits.message_burst_per_address = 1_000_000;
    config.limits.connections_per_address = 256;
    config.auth.attempts_per_minute_per_address = 1_000_000;
    config.auth.lookups_per_minute_per_address = 1_000_000;
    config.auth.token_ttl_secs = 7 * 24 * 3600;
    config.auth.session_max_lifetime_secs = 30 * 24 * 3600;
    config.limits.fanout_bytes_per_second_per_user = u32::MAX;
    config.limits.fanout_burst_bytes_per_user = u32::MAX;
    config.limits.max_recipients_per_send = syncra_core::crypto::envelope::MAX_RECIPIENTS;
    // No mailbox: the relay's state would otherwise grow with every input (and a login's
    // backlog with it), so an input's outcome would depend on all earlier ones.
    config.mailbox = serde_json::json!({ "kind": "none" });
    config
}

impl Harness {
    /// The harness of this process, started on first use.
    pub fn get() -> &'static Harness {
        static HARNESS: OnceLock<Harness> = OnceLock::new();
        HARNESS.get_or_init(Harness::start)
    }

    fn start() -> Harness {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let dir = crate::process_dir("syncra-fuzz-relay-");
        let alice = User::new(0xa1, "fuzz_alice");
        let bob = User::new(0xb0, "fuzz_bob");
        let carol = User::new(0xc0, "fuzz_carol");
        let (relay, url, alice_token) = rt.block_on(async {
            let relay = Relay::start(harness_config(dir.join("data")))
                .await
                .expect("the relay starts");
            let url = relay.url().to_owned();
            let mut token = String::new();
            for user in [&alice, &bob] {
                let mut c = Conn::open(&url).await;
                let nonce = c.view.borrow().nonce;
                c.allow(user.id());
                c.send(user.register_frame(&user.handle, &nonce).encode())
                    .await;
                let v = c.sync().await;
                assert_eq!(v.authed, Some(user.id()), "fixture user registers");
                if user.handle == alice.handle {
                    token = v.token.expect("token");
                }
            }
            (relay, url, token)
        });
        Harness {
            rt,
            url,
            alice,
            bob,
            carol,
            alice_token,
            _relay: relay,
        }
    }

    fn user(&self, who: Who) -> &User {
        match who {
            Who::Alice => &self.alice,
            Who::Bob => &self.bob,
        }
    }

    fn pick(&self, p: Pick) -> UserId {
        match p {
            Pick::Alice => self.alice.id(),
            Pick::Bob => self.bob.id(),
            Pick::Carol => self.carol.id(),
            Pick::Other(b) => UserId::from_bytes(b),
        }
    }

    fn handle(&self, h: &HandleArg) -> String {
        match h {
            HandleArg::Alice => self.alice.handle.clone(),
            HandleArg::Bob => self.bob.handle.clone(),
            HandleArg::Carol => self.carol.handle.clone(),
            HandleArg::Raw(s) => s.clone(),
        }
    }

    fn frame(&self, f: &FuzzFrame) -> Frame {
        let prekey = |p: &FuzzPrekey| SignedPrekey {
            public: p.public,
            created_at: p.created_at,
            signature: p.signature,
        };
        match f.clone() {
            FuzzFrame::Challenge {
                relay_id,
                nonce,
                server_time_ms,
                max_frame,
            } => Frame::Challenge {
                relay_id,
                nonce,
                server_time_ms,
                max_frame,
            },
            FuzzFrame::AuthOk {
                user,
                token,
                token_expires_ms,
            } => Frame::AuthOk {
                user_id: self.pick(user),
                token,
                token_expires_ms,
            },
            FuzzFrame::Record {
                request_id,
                user,
                handle,
                identity_key,
                prekey: p,
            } => Frame::Record {
                request_id,
                record: IdentityRecord {
                    user_id: self.pick(user),
                    handle: Handle::parse(&self.handle(&handle))
                        .unwrap_or_else(|_| Handle::parse("fuzz_record").expect("valid handle")),
                    identity_key,
                    prekey: prekey(&p),
                },
            },
            FuzzFrame::Ack { request_id } => Frame::Ack { request_id },
            FuzzFrame::SendResult {
                request_id,
                message_id,
                outcomes,
            } => Frame::SendResult {
                request_id,
                message_id,
                outcomes: outcomes
                    .into_iter()
                    .map(|(p, kind, code)| RecipientOutcome {
                        user_id: self.pick(p),
                        outcome: match kind % 3 {
                            0 => Outcome::Delivered,
                            1 => Outcome::Offline,
                            _ => Outcome::Rejected(ErrorCode::from_u16(code)),
                        },
                    })
                    .collect(),
            },
            FuzzFrame::Deliver { envelope } => Frame::Deliver {
                envelope: envelope.into(),
            },
            FuzzFrame::Error {
                request_id,
                code,
                message,
            } => Frame::Error {
                request_id,
                code: ErrorCode::from_u16(code),
                message,
            },
            FuzzFrame::Register {
                handle,
                identity_key,
                prekey: p,
                signature,
            } => Frame::Register {
                handle: self.handle(&handle),
                identity_key,
                prekey: prekey(&p),
                signature,
            },
            FuzzFrame::Auth { user, signature } => Frame::Auth {
                user_id: self.pick(user),
                url: FUZZ_URL.into(),
                signature,
            },
            FuzzFrame::Resume { token } => Frame::Resume { token },
            FuzzFrame::LookupHandle { request_id, handle } => Frame::LookupHandle {
                request_id,
                handle: self.handle(&handle),
            },
            FuzzFrame::LookupId { request_id, user } => Frame::LookupId {
                request_id,
                user_id: self.pick(user),
            },
            FuzzFrame::RotatePrekey {
                request_id,
                prekey: p,
            } => Frame::RotatePrekey {
                request_id,
                prekey: prekey(&p),
            },
            FuzzFrame::Send {
                request_id,
                envelope,
            } => Frame::Send {
                request_id,
                envelope: envelope.into(),
            },
            FuzzFrame::Ping { nonce } => Frame::Ping {
                nonce: nonce & !HARNESS_PING,
            },
            FuzzFrame::Pong { nonce } => Frame::Pong { nonce },
        }
    }

    /// A well-formed envelope shape naming `to`, junk where the crypto goes.
    fn shaped_envelope(&self, to: &[Pick], extra: u8) -> Vec<u8> {
        const INNER_MIN: usize = 20 + 32 + 8 + 32 + 64 + 256 + 16;
        let mut out = vec![syncra_core::crypto::envelope::ENVELOPE_VERSION];
        out.extend_from_slice(&[0x11; 16]);
        out.extend_from_slice(&(to.len() as u16).to_be_bytes());
        for p in to {
            out.extend_from_slice(self.pick(*p).as_bytes());
            out.extend_from_slice(&[0x22; 32]);
        }
        out.extend(std::iter::repeat_n(0x33, to.len() * (32 + 80)));
        out.extend_from_slice(&[0x44; 12]);
        let ct = INNER_MIN + usize::from(extra);
        out.extend_from_slice(&(ct as u32).to_be_bytes());
        out.extend(std::iter::repeat_n(0x55, ct));
        out
    }

    /// Plays one input and checks the relay afterwards.
    pub fn run(&self, actions: &[Action]) {
        self.rt.block_on(self.play(actions));
    }

    async fn play(&self, actions: &[Action]) {
        let mut conns: [Option<Conn>; 2] = [None, None];
        let mut cur = 0usize;
        for action in actions.iter().take(MAX_ACTIONS) {
            if conns[cur].is_none() {
                conns[cur] = Some(Conn::open(&self.url).await);
            }
            let c = conns[cur].as_mut().expect("just opened");
            match action {
                Action::Frame(f) => c.send(self.frame(f).encode()).await,
                Action::Raw(bytes) => c.send(Bytes::copy_from_slice(bytes)).await,
                Action::Oversize { extra } => {
                    let mut big = vec![0u8; MAX_FRAME + 1 + usize::from(*extra)];
                    big[0] = syncra_core::wire::PROTOCOL_VERSION;
                    big[1] = 0x16;
                    c.send(big.into()).await;
                }
                Action::Login(who) => {
                    let user = self.user(*who);
                    let v = c.sync().await;
                    c.allow(user.id());
                    c.send(user.auth_frame(&v.nonce).encode()).await;
                }
                Action::StaleLogin(who) => {
                    let user = self.user(*who);
                    let v = c.sync().await;
                    // Not a valid proof: the nonce was already consumed (or never issued).
                    c.send(user.auth_frame(&v.previous_nonce).encode()).await;
                }
                Action::Register(handle) => {
                    let v = c.sync().await;
                    c.allow(self.carol.id());
                    let handle = self.handle(handle);
                    c.send(self.carol.register_frame(&handle, &v.nonce).encode())
                        .await;
                }
                Action::Resume => {
                    c.allow(self.alice.id());
                    c.send(
                        Frame::Resume {
                            token: self.alice_token.clone(),
                        }
                        .encode(),
                    )
                    .await;
                }
                Action::TamperedResume { at, byte } => {
                    let mut token = self.alice_token.clone().into_bytes();
                    let i = usize::from(*at) % token.len();
                    // The last character of a base64url segment carries padding bits that a
                    // decoder may ignore, so changing it can leave the token valid: skip those
                    // positions so that any auth_ok here is a real signature bypass.
                    let segment_end = token.get(i + 1).is_none_or(|&b| b == b'.');
                    if token[i] != *byte && token[i] != b'.' && !segment_end {
                        token[i] = *byte;
                        let token = String::from_utf8_lossy(&token).into_owned();
                        c.send(Frame::Resume { token }.encode()).await;
                    }
                }
                Action::Rotate {
                    request_id,
                    offset_secs,
                } => {
                    let created_at = (syncra_core::now_ms() / 1000)
                        .saturating_add_signed(i64::from(*offset_secs));
                    let mut rng = rand::rngs::StdRng::seed_from_u64(*offset_secs as u64);
                    let prekey =
                        PrekeySecret::generate_with(&self.alice.identity, created_at, &mut rng);
                    c.send(
                        Frame::RotatePrekey {
                            request_id: *request_id,
                            prekey: prekey.signed().clone(),
                        }
                        .encode(),
                    )
                    .await;
                }
                Action::SendShaped {
                    request_id,
                    to,
                    extra,
                } => {
                    let envelope = self.shaped_envelope(to, *extra);
                    c.send(
                        Frame::Send {
                            request_id: *request_id,
                            envelope: envelope.into(),
                        }
                        .encode(),
                    )
                    .await;
                }
                Action::SendSealed {
                    request_id,
                    to,
                    body,
                } => {
                    let mut recipients: Vec<Recipient> = Vec::new();
                    for who in to.iter().take(4) {
                        let r = self.user(*who).recipient();
                        if !recipients.iter().any(|x| x.user_id == r.user_id) {
                            recipients.push(r);
                        }
                    }
                    if let Ok(sealed) = seal(
                        &self.alice.identity,
                        &recipients,
                        &body[..body.len().min(4096)],
                        syncra_core::now_ms(),
                    ) {
                        c.send(
                            Frame::Send {
                                request_id: *request_id,
                                envelope: sealed.bytes.into(),
                            }
                            .encode(),
                        )
                        .await;
                    }
                }
                Action::Sync => {
                    c.sync().await;
                }
                Action::Switch => cur = 1 - cur,
                Action::Reconnect => {
                    if let Some(mut old) = conns[cur].take() {
                        let _ = old.sink.close(CloseReason::normal("fuzz reconnect")).await;
                    }
                }
            }
        }
        // Everything sent has been answered (or the relay closed the connection with a reason).
        for c in conns.iter_mut().flatten() {
            c.sync().await;
        }
        drop(conns);
        self.probe().await;
    }

    /// A fresh connection must get a challenge and a pong. Closing connections is asynchronous
    /// on the relay side, so a refusal for too many connections is retried for a while before
    /// it counts as leaked slots.
    async fn probe(&self) {
        let start = tokio::time::Instant::now();
        loop {
            let mut c = Conn::open(&self.url).await;
            if !c.dead {
                let v = c.sync().await;
                assert!(
                    !c.dead && v.last_pong >= 1,
                    "RELAY NOT ANSWERING: a fresh connection got no pong (closed: {:?})",
                    v.closed
                );
                return;
            }
            let reason = c.view.borrow().closed.clone();
            assert!(
                start.elapsed() < DEADLINE,
                "RELAY REFUSES NEW CONNECTIONS for {DEADLINE:?} (leaked connection slots?): \
                 {reason:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

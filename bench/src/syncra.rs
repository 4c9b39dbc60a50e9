//! The client side of the Syncra wire protocol, as much as the load generator needs: open a
//! connection, register, log in (challenge–response) or resume with a token, and read frames.
//!
//! Users are made here with real identity keys and signed prekeys, so the relay does exactly
//! the work it does for real clients (signature checks at registration and login, header
//! parsing on every send).

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use syncra_core::UserId;
use syncra_core::crypto::envelope::Recipient;
use syncra_core::crypto::keys::{IdentityKeyPair, PrekeyRing, PrekeySecret};
use syncra_core::wire::{Frame, NONCE_LEN, login_statement, register_statement};
use tokio_tungstenite::tungstenite::Message;

use crate::ws::{self, Ws};

/// The largest frame the load generator accepts (the relay's own limit is at most 16 MiB).
pub const MAX_FRAME: usize = 16 * 1024 * 1024;
/// How long the relay may take to answer a handshake step.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

/// A user of the load run: identity, prekeys and a unique handle.
pub struct LoadUser {
    /// The identity key pair.
    pub identity: IdentityKeyPair,
    /// The prekey ring (the receiver opens with it in e2e mode).
    pub ring: PrekeyRing,
    /// The handle it registers.
    pub handle: String,
}

impl std::fmt::Debug for LoadUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadUser")
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

/// A short random tag shared by all users of one run, so handles never collide with an
/// earlier run against the same store.
pub fn run_tag() -> String {
    let mut b = [0u8; 4];
    syncra_core::crypto::fill_random(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl LoadUser {
    /// A fresh user; the handle is `{prefix}_{tag}_{index}` (at most 32 characters).
    pub fn new(prefix: &str, tag: &str, index: usize) -> LoadUser {
        let identity = IdentityKeyPair::generate();
        let ring = PrekeyRing::new(PrekeySecret::generate(
            &identity,
            syncra_core::now_ms() / 1000,
        ));
        LoadUser {
            identity,
            ring,
            handle: format!("{prefix}_{tag}_{index}"),
        }
    }

    /// The user id.
    pub fn id(&self) -> UserId {
        self.identity.user_id()
    }

    /// What senders seal to.
    pub fn recipient(&self) -> Recipient {
        Recipient {
            user_id: self.id(),
            prekey: *self.ring.current().public(),
        }
    }
}

/// A connection that has read its challenge.
pub struct Opened {
    /// The WebSocket.
    pub ws: Ws,
    /// The relay id from the challenge.
    pub relay_id: String,
    /// The nonce from the challenge.
    pub nonce: [u8; NONCE_LEN],
}

/// The next protocol frame, `None` when the connection closed. WebSocket pings and pongs are
/// skipped (tungstenite answers pings itself).
pub async fn next_frame(ws: &mut Ws) -> anyhow::Result<Option<Frame>> {
    loop {
        match ws.next().await {
            None => return Ok(None),
            Some(Err(e)) => bail!("connection failed: {e}"),
            Some(Ok(Message::Binary(bytes))) => {
                return Ok(Some(
                    Frame::decode(&bytes, MAX_FRAME).context("the relay sent an invalid frame")?,
                ));
            }
            Some(Ok(Message::Close(frame))) => {
                if let Some(f) = frame {
                    bail!("the relay closed the connection: {} {}", f.code, f.reason);
                }
                return Ok(None);
            }
            Some(Ok(_)) => continue,
        }
    }
}

async fn reply(ws: &mut Ws) -> anyhow::Result<Frame> {
    tokio::time::timeout(REPLY_TIMEOUT, next_frame(ws))
        .await
        .context("the relay did not answer in time")??
        .context("the relay closed the connection")
}

/// Connects and reads the challenge.
pub async fn open(url: &str, source: Option<IpAddr>) -> anyhow::Result<Opened> {
    let mut ws = ws::connect(url, source).await?;
    match reply(&mut ws).await? {
        Frame::Challenge {
            relay_id, nonce, ..
        } => Ok(Opened {
            ws,
            relay_id,
            nonce,
        }),
        Frame::Error { code, message, .. } => {
            bail!("relay refused the connection: {code}: {message}")
        }
        other => bail!("expected a challenge, got {}", other.kind()),
    }
}

/// Sends one frame and flushes.
pub async fn send_frame(ws: &mut Ws, frame: &Frame) -> anyhow::Result<()> {
    ws.send(Message::Binary(frame.encode()))
        .await
        .context("sending to the relay")
}

async fn expect_auth_ok(ws: &mut Ws, user: UserId) -> anyhow::Result<String> {
    match reply(ws).await? {
        Frame::AuthOk { user_id, token, .. } if user_id == user => Ok(token),
        Frame::AuthOk { .. } => bail!("the relay authenticated another user"),
        Frame::Error { code, message, .. } => bail!("authentication failed: {code}: {message}"),
        other => bail!("expected auth_ok, got {}", other.kind()),
    }
}

/// Registers `user` on a fresh connection. Returns the authenticated connection and the
/// resume token.
pub async fn register(
    user: &LoadUser,
    url: &str,
    source: Option<IpAddr>,
) -> anyhow::Result<(Ws, String)> {
    let Opened {
        mut ws,
        relay_id,
        nonce,
    } = open(url, source).await?;
    let prekey = user.ring.current().signed().clone();
    let identity_key = user.identity.public();
    let statement = register_statement(&relay_id, &nonce, &user.handle, &identity_key, &prekey);
    let frame = Frame::Register {
        handle: user.handle.clone(),
        identity_key,
        prekey,
        signature: user.identity.sign(&statement),
    };
    send_frame(&mut ws, &frame).await?;
    let token = expect_auth_ok(&mut ws, user.id())
        .await
        .with_context(|| format!("registering {}", user.handle))?;
    Ok((ws, token))
}

/// Registers `count` fresh users (handles `{prefix}_{run tag}_{i}`), `concurrency` at a time,
/// user `i` on `url_of(i)` from `source_of(i)`, closing each connection after its `AuthOk`.
/// Returns the users with their resume tokens, in index order.
pub async fn register_many(
    prefix: &str,
    count: usize,
    concurrency: usize,
    url_of: impl Fn(usize) -> String,
    source_of: impl Fn(usize) -> Option<IpAddr>,
) -> anyhow::Result<Vec<(LoadUser, String)>> {
    let tag = run_tag();
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..count {
        let (gate, url, source) = (gate.clone(), url_of(i), source_of(i));
        let user = LoadUser::new(prefix, &tag, i);
        set.spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let (ws, token) = register(&user, &url, source).await?;
            close(ws).await;
            anyhow::Ok((i, user, token))
        });
    }
    let mut users = Vec::with_capacity(count);
    while let Some(r) = set.join_next().await {
        users.push(r.context("a registration task panicked")??);
    }
    users.sort_by_key(|(i, _, _)| *i);
    Ok(users.into_iter().map(|(_, u, t)| (u, t)).collect())
}

/// Logs `user` in with a signed challenge on a fresh connection.
pub async fn login(user: &LoadUser, url: &str, source: Option<IpAddr>) -> anyhow::Result<Ws> {
    let Opened {
        mut ws,
        relay_id,
        nonce,
    } = open(url, source).await?;
    let statement = login_statement(&relay_id, url, &nonce, &user.id());
    let frame = Frame::Auth {
        user_id: user.id(),
        url: url.to_owned(),
        signature: user.identity.sign(&statement),
    };
    send_frame(&mut ws, &frame).await?;
    expect_auth_ok(&mut ws, user.id())
        .await
        .with_context(|| format!("logging in {}", user.handle))?;
    Ok(ws)
}

/// Resumes a session with a token on a fresh connection.
pub async fn resume(
    user: UserId,
    token: &str,
    url: &str,
    source: Option<IpAddr>,
) -> anyhow::Result<Ws> {
    let Opened { mut ws, .. } = open(url, source).await?;
    send_frame(
        &mut ws,
        &Frame::Resume {
            token: token.to_owned(),
        },
    )
    .await?;
    expect_auth_ok(&mut ws, user).await.context("resuming")?;
    Ok(ws)
}

/// Closes a connection politely, without waiting long for the relay's answer.
pub async fn close(mut ws: Ws) {
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
}

/// The encoded `Send` frame for an envelope.
pub fn send_frame_bytes(request_id: u32, envelope: Bytes) -> Bytes {
    Frame::Send {
        request_id,
        envelope,
    }
    .encode()
}

//! The message load: N senders, each sending to its receiver (or to K receivers at once), over
//! Syncra relays or, as the reference peer, over nats-server's WebSocket listener.
//!
//! Method (written up in `docs/BENCHMARKS.md`):
//! - Every message carries a 16-byte stamp: sender index (u32), sequence (u32) and send time
//!   (u64 nanoseconds on this process's monotonic clock). The receiver subtracts the send time
//!   from its own clock: sender and receiver are tasks of this one process, so no clock sync
//!   is needed.
//! - **relay-only** (Syncra): envelopes are sealed before the run, a small pool per sender, and
//!   reused. The stamp is written over the envelope's message id (the 16 bytes after the
//!   version byte), which the relay reads but does not authenticate (only recipients do, and
//!   they do not open in this mode). Each `Send` therefore carries a unique message id and its
//!   own timestamp at the cost of one copy — no side table, no sealing in the hot loop, and
//!   the relay does exactly the work it does for a real envelope of that size.
//! - **e2e** (Syncra): each message is sealed when it is sent (the stamp is the first 16 bytes
//!   of the body) and every receiver opens it with a replay guard, the sender's key pinned.
//!   Latency then includes sealing and opening.
//! - **NATS**: each message is one `PUB` of a payload as large as the Syncra envelope, to a
//!   subject per sender that its receivers subscribe to.
//! - Pacing is either a window (each sender keeps at most W messages not yet received by all
//!   its recipients; a Syncra outcome other than delivered frees the slot too) or a fixed total
//!   rate (open loop: each sender fires on its own schedule, phases spread evenly). Latency is
//!   always measured from the moment the message is handed to the socket; in rate mode the
//!   report adds the *schedule lag* (how late each send left against its schedule; tokio's
//!   timer has millisecond granularity), so a generator that falls behind — and would thereby
//!   hide queueing (coordinated omission) — shows up there instead of going unnoticed.
//! - The first `warmup` seconds are not measured. Counts and `/proc` CPU samples are taken at
//!   the start and end of the measured window; then senders stop and the run drains for up to
//!   `drain` before counting losses.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use syncra_core::UserId;
use syncra_core::carriage::{
    CARRIAGE_VERSION, CarriageHeader, CarriageKind, GROUP_ID_LEN, GroupId,
};
use syncra_core::crypto::envelope::{AcceptWindow, Opener, Recipient, ReplayGuard, seal};
use syncra_core::crypto::keys::IdentityKeyPair;
use syncra_core::wire::{ErrorCode, Frame, Outcome, PROTOCOL_VERSION};
use tokio::sync::{Mutex, Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

use crate::nats::{self, Event, NatsConn};
use crate::procstat;
use crate::report::{Latency, LoadReport, ProcessStats, Totals, new_histogram};
use crate::syncra::{self, LoadUser};
use crate::ws::Ws;

/// Bytes of the per-message stamp.
pub const STAMP_LEN: usize = 16;
/// In rate mode, the most messages one sender may have in flight before scheduled sends are
/// skipped (and counted): a bound on memory if the server stalls.
pub const RATE_MODE_CAP: u32 = 4096;
/// Handshakes (register, login, subscribe) run this many at a time.
const SETUP_CONCURRENCY: usize = 32;
/// The most frames a sender writes before one flush.
const MAX_BATCH: i64 = 64;
/// The sealed envelopes each relay-only sender cycles through.
const POOL: usize = 4;

/// Which server and, for Syncra, which client work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum System {
    /// Syncra relays; envelopes sealed ahead of time, not opened.
    SyncraRelayOnly,
    /// Syncra relays; sealed per message and opened by every receiver.
    SyncraE2e,
    /// Syncra relays; MLS carriages (the format every conversation uses): one group per
    /// sender, created by one commit before the run, then application messages in its epoch 1,
    /// made ahead of time and not opened (the relay never reads the MLS message, only the
    /// carriage header, and checks each against its group).
    SyncraMls,
    /// nats-server over WebSocket.
    Nats,
}

/// How senders are paced.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pacing {
    /// At most this many messages in flight per sender.
    Window(u32),
    /// This many messages per second in total, spread evenly over the senders.
    Rate(f64),
}

/// What to run.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Server and client work.
    pub system: System,
    /// Server URLs; with several, each sender and its receiver sit on different servers.
    pub urls: Vec<String>,
    /// Sender/receiver pairs.
    pub pairs: usize,
    /// Recipients per message (≤ pairs): sender i sends to receivers i, i+1, … (mod pairs).
    pub recipients: usize,
    /// Body size in bytes.
    pub size: usize,
    /// Measured window.
    pub duration: Duration,
    /// Unmeasured warm-up before it.
    pub warmup: Duration,
    /// Pacing.
    pub pacing: Pacing,
    /// Server processes to sample.
    pub pids: Vec<u32>,
    /// How long to wait for in-flight messages after the senders stop.
    pub drain: Duration,
}

/// The 16-byte stamp: sender index, sequence and send time.
pub(crate) fn stamp(sender: u32, seq: u32, ns: u64) -> [u8; STAMP_LEN] {
    let mut s = [0u8; STAMP_LEN];
    s[..4].copy_from_slice(&sender.to_be_bytes());
    s[4..8].copy_from_slice(&seq.to_be_bytes());
    s[8..].copy_from_slice(&ns.to_be_bytes());
    s
}

fn read_stamp(b: &[u8]) -> Option<(u32, u64)> {
    let s: &[u8; STAMP_LEN] = b.get(..STAMP_LEN)?.try_into().ok()?;
    let sender = u32::from_be_bytes([s[0], s[1], s[2], s[3]]);
    let ns = u64::from_be_bytes([s[8], s[9], s[10], s[11], s[12], s[13], s[14], s[15]]);
    Some((sender, ns))
}

/// Per-sender flow control: deliveries sent and not yet received (or refused).
#[derive(Default)]
struct SenderSlot {
    outstanding: AtomicI64,
    notify: Notify,
}

/// State every task shares.
struct Shared {
    base: Instant,
    measure_from_ns: AtomicU64,
    stop: AtomicBool,
    sent: AtomicU64,
    answered: AtomicU64,
    received: AtomicU64,
    senders: Vec<SenderSlot>,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    fn ns_of(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_nanos() as u64
    }

    /// Frees `n` delivery slots of a sender.
    fn release(&self, sender: usize, n: i64) {
        if let Some(s) = self.senders.get(sender) {
            s.outstanding.fetch_sub(n, Ordering::AcqRel);
            s.notify.notify_one();
        }
    }

    /// A delivery arrived.
    fn received(&self, stamp: Option<(u32, u64)>, hist: &mut Histogram<u64>) {
        self.received.fetch_add(1, Ordering::Relaxed);
        let Some((sender, sent_ns)) = stamp else {
            return;
        };
        self.release(sender as usize, 1);
        if sent_ns >= self.measure_from_ns.load(Ordering::Relaxed) {
            let latency = self.now_ns().saturating_sub(sent_ns).max(1);
            let _ = hist.record(latency.min(hist.high()));
        }
    }

    fn outstanding(&self) -> i64 {
        self.senders
            .iter()
            .map(|s| s.outstanding.load(Ordering::Acquire))
            .sum()
    }
}

/// What a receiver task saw.
struct ReceiverResult {
    hist: Histogram<u64>,
    overflow_notices: u64,
    open_failures: u64,
    error: Option<String>,
}

/// What a sender (and the reader of its connection) saw.
#[derive(Default)]
struct SenderResult {
    skipped: u64,
    /// Rate mode: how late each send went out against its schedule.
    lag: Option<Histogram<u64>>,
    delivered: u64,
    offline: u64,
    rejected: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    error: Option<String>,
}

/// Receivers of sender `s`: `s, s+1, …, s+k-1` (mod `n`).
fn group_of(s: usize, k: usize, n: usize) -> impl Iterator<Item = usize> {
    (0..k).map(move |j| (s + j) % n)
}

/// The server of sender `i` and of receiver `i`: on different servers when there are several.
fn sender_url(urls: &[String], i: usize) -> &str {
    &urls[i % urls.len()]
}
fn receiver_url(urls: &[String], i: usize) -> &str {
    &urls[(i + 1) % urls.len()]
}

/// Runs one load and returns its report.
pub async fn run(config: LoadConfig) -> anyhow::Result<LoadReport> {
    if config.pairs == 0 {
        bail!("--pairs must be at least 1");
    }
    if config.recipients == 0 || config.recipients > config.pairs {
        bail!(
            "--recipients must be between 1 and --pairs ({}): each sender sends to that many of \
             the receivers",
            config.pairs
        );
    }
    if config.urls.is_empty() {
        bail!("give at least one --url");
    }
    if config.system == System::SyncraE2e && config.size < STAMP_LEN {
        bail!("e2e mode needs --size of at least {STAMP_LEN} bytes for the timestamp");
    }
    procstat::check_pids(&config.pids)?;
    match config.system {
        System::Nats => run_nats(config).await,
        _ => run_syncra(config).await,
    }
}

/// Samples taken at the edges of the measured window.
struct Sample {
    at: Instant,
    received: u64,
    sent: u64,
    server_cpu: f64,
    self_cpu: f64,
    machine_busy: f64,
}

fn sample(shared: &Shared, pids: &[u32]) -> anyhow::Result<Sample> {
    Ok(Sample {
        at: Instant::now(),
        received: shared.received.load(Ordering::Relaxed),
        sent: shared.sent.load(Ordering::Relaxed),
        server_cpu: procstat::cpu_seconds_all(pids)?,
        self_cpu: procstat::cpu_seconds(procstat::self_pid())?,
        machine_busy: procstat::machine_busy_seconds()?,
    })
}

/// Starts the senders, waits out warm-up and measurement, stops, drains. Returns the samples.
async fn drive(
    config: &LoadConfig,
    shared: &Shared,
    start: &watch::Sender<Option<Instant>>,
    needs_answers: bool,
) -> anyhow::Result<(Sample, Sample)> {
    let t0 = Instant::now() + Duration::from_millis(20);
    shared
        .measure_from_ns
        .store(shared.ns_of(t0 + config.warmup), Ordering::Relaxed);
    let _ = start.send(Some(t0));
    tokio::time::sleep_until((t0 + config.warmup).into()).await;
    let first = sample(shared, &config.pids)?;
    tokio::time::sleep_until((first.at + config.duration).into()).await;
    let second = sample(shared, &config.pids)?;
    shared.stop.store(true, Ordering::Release);
    for s in &shared.senders {
        s.notify.notify_one();
    }
    let drain_until = Instant::now() + config.drain;
    while Instant::now() < drain_until {
        let answered = !needs_answers
            || shared.answered.load(Ordering::Acquire) >= shared.sent.load(Ordering::Acquire);
        if shared.outstanding() <= 0 && answered {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok((first, second))
}

fn process_stats(pids: &[u32], cpu: f64, delivered: u64, secs: f64) -> ProcessStats {
    let mut rss = 0;
    let mut hwm = 0;
    for pid in pids {
        if let Ok(m) = procstat::memory(*pid) {
            rss += m.rss_kib;
            hwm += m.hwm_kib;
        }
    }
    ProcessStats {
        pids: pids.to_vec(),
        cpu_s: cpu,
        cpu_us_per_delivered: if delivered > 0 {
            cpu * 1e6 / delivered as f64
        } else {
            0.0
        },
        cores_busy: if secs > 0.0 { cpu / secs } else { 0.0 },
        rss_kib: rss,
        hwm_kib: hwm,
    }
}

#[allow(clippy::too_many_arguments)]
fn build_report(
    config: &LoadConfig,
    system: &str,
    mode: &str,
    wire_bytes: usize,
    first: &Sample,
    second: &Sample,
    hist: &Histogram<u64>,
    lag: Option<&Histogram<u64>>,
    totals: Totals,
) -> LoadReport {
    let secs = second.at.duration_since(first.at).as_secs_f64();
    let delivered = second.received - first.received;
    let pacing = match config.pacing {
        Pacing::Window(w) => format!("window {w} per sender"),
        Pacing::Rate(r) => format!("fixed rate {r:.0} msg/s total"),
    };
    LoadReport {
        system: system.into(),
        mode: mode.into(),
        urls: config.urls.clone(),
        pairs: config.pairs,
        recipients: config.recipients,
        size: config.size,
        wire_bytes,
        pacing,
        warmup_s: config.warmup.as_secs_f64(),
        measured_s: secs,
        sent_per_s: (second.sent - first.sent) as f64 / secs,
        delivered_per_s: delivered as f64 / secs,
        latency: Latency::from_histogram(hist),
        schedule_lag: lag.map(Latency::from_histogram),
        totals,
        server: (!config.pids.is_empty()).then(|| {
            process_stats(
                &config.pids,
                second.server_cpu - first.server_cpu,
                delivered,
                secs,
            )
        }),
        generator: process_stats(
            &[procstat::self_pid()],
            second.self_cpu - first.self_cpu,
            delivered,
            secs,
        ),
        machine_cores_busy: (second.machine_busy - first.machine_busy) / secs,
        other_cores_busy: ((second.machine_busy - first.machine_busy)
            - (second.server_cpu - first.server_cpu)
            - (second.self_cpu - first.self_cpu))
            .max(0.0)
            / secs,
        clock_ticks: procstat::clock_ticks_per_second(),
    }
}

/// Waits for the start signal; returns the start instant, or `None` if the run was abandoned.
async fn wait_start(start: &mut watch::Receiver<Option<Instant>>) -> Option<Instant> {
    loop {
        if let Some(t) = *start.borrow_and_update() {
            return Some(t);
        }
        start.changed().await.ok()?;
    }
}

/// The pace of one sender.
enum Pace {
    Window {
        limit: i64,
    },
    Rate {
        interval: tokio::time::Interval,
        cap: i64,
    },
}

impl Pace {
    fn new(pacing: Pacing, k: i64, t0: Instant, index: usize, senders: usize) -> Pace {
        match pacing {
            Pacing::Window(w) => Pace::Window {
                limit: i64::from(w.max(1)) * k,
            },
            Pacing::Rate(total) => {
                let per_sender = (total / senders as f64).max(0.001);
                let period = Duration::from_secs_f64(1.0 / per_sender);
                // Spread the senders' phases evenly so they do not all fire at once.
                let phase = period.mul_f64(index as f64 / senders as f64);
                let mut interval = tokio::time::interval_at((t0 + phase).into(), period);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                Pace::Rate {
                    interval,
                    cap: i64::from(RATE_MODE_CAP) * k,
                }
            }
        }
    }

    /// Waits until messages may go; returns how many and the send time to stamp (for the rate
    /// mode, the scheduled time). `None` when the run stops. `skipped` counts scheduled sends
    /// dropped because the sender's in-flight cap was out.
    async fn next(
        &mut self,
        shared: &Shared,
        slot: &SenderSlot,
        k: i64,
        skipped: &mut u64,
    ) -> Option<(i64, Option<u64>)> {
        loop {
            if shared.stop.load(Ordering::Acquire) {
                return None;
            }
            match self {
                Pace::Window { limit } => {
                    let room = (*limit - slot.outstanding.load(Ordering::Acquire)) / k;
                    if room > 0 {
                        return Some((room.min(MAX_BATCH), None));
                    }
                    tokio::select! {
                        _ = slot.notify.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                }
                Pace::Rate { interval, cap } => {
                    tokio::select! {
                        at = interval.tick() => {
                            if shared.stop.load(Ordering::Acquire) {
                                return None;
                            }
                            if slot.outstanding.load(Ordering::Acquire) + k > *cap {
                                *skipped += 1;
                                continue;
                            }
                            return Some((1, Some(shared.ns_of(at.into_std()))));
                        }
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Syncra

/// Makes the `Send` frames of one sender.
enum Envelopes {
    /// Pre-encoded `Send` frames (request id and message id patched per message).
    Pool { frames: Vec<Vec<u8>>, next: usize },
    /// Seal each message.
    Seal {
        identity: Box<IdentityKeyPair>,
        recipients: Vec<Recipient>,
        size: usize,
    },
}

/// Offsets inside an encoded `Send`: version, type, request id (4), envelope length (4), then
/// the envelope, whose message id follows its version byte.
const SEND_REQUEST_ID_AT: usize = 2;
const SEND_MESSAGE_ID_AT: usize = 2 + 4 + 4 + 1;

impl Envelopes {
    fn frame(&mut self, request_id: u32, stamp: [u8; STAMP_LEN]) -> anyhow::Result<Bytes> {
        match self {
            Envelopes::Pool { frames, next } => {
                let template = &frames[*next % frames.len()];
                *next += 1;
                Ok(patched(template, request_id, stamp))
            }
            Envelopes::Seal {
                identity,
                recipients,
                size,
            } => {
                let mut body = vec![0u8; *size];
                body[..STAMP_LEN].copy_from_slice(&stamp);
                let sealed =
                    seal(identity, recipients, &body, syncra_core::now_ms()).context("sealing")?;
                Ok(syncra::send_frame_bytes(request_id, sealed.bytes.into()))
            }
        }
    }
}

/// A copy of a pre-encoded `Send` frame with its own request id and message id (the stamp).
pub(crate) fn patched(template: &[u8], request_id: u32, stamp: [u8; STAMP_LEN]) -> Bytes {
    let mut out = BytesMut::with_capacity(template.len());
    out.put_slice(template);
    out[SEND_REQUEST_ID_AT..SEND_REQUEST_ID_AT + 4].copy_from_slice(&request_id.to_be_bytes());
    out[SEND_MESSAGE_ID_AT..SEND_MESSAGE_ID_AT + STAMP_LEN].copy_from_slice(&stamp);
    out.freeze()
}

/// A few `Send` frames sealed ahead of time from `identity` to `recipients`, with bodies of
/// `size` bytes, to be [`patched`] per message.
pub(crate) fn pool_frames(
    identity: &IdentityKeyPair,
    recipients: &[Recipient],
    size: usize,
) -> anyhow::Result<Vec<Vec<u8>>> {
    (0..POOL)
        .map(|i| {
            let body = vec![i as u8; size];
            let sealed = seal(identity, recipients, &body, syncra_core::now_ms())?;
            let frame = syncra::send_frame_bytes(0, sealed.bytes.into()).to_vec();
            debug_assert_eq!(frame[0], PROTOCOL_VERSION);
            Ok(frame)
        })
        .collect()
}

/// Creates a sender's MLS group at the relay: a commit carriage for epoch 0 naming the sender
/// and its recipients, answered before the run starts. The relay only reads carriage headers,
/// so the MLS message is filler. Receivers see the commit and do not count it ([`is_commit`]).
async fn create_group(
    ws: &mut Ws,
    sender: UserId,
    recipients: &[UserId],
) -> anyhow::Result<GroupId> {
    let mut group = [0u8; GROUP_ID_LEN];
    syncra_core::crypto::fill_random(&mut group);
    let mut members = vec![sender];
    members.extend_from_slice(recipients);
    let mut message_id = [0u8; STAMP_LEN];
    syncra_core::crypto::fill_random(&mut message_id);
    let commit = CarriageHeader {
        message_id,
        kind: CarriageKind::Commit,
        group_id: GroupId(group),
        epoch: 0,
        recipients: recipients.to_vec(),
        members,
    }
    .encode(&[0u8; 64]);
    ws.send(Message::Binary(syncra::send_frame_bytes(1, commit.into())))
        .await
        .context("sending a group's commit")?;
    loop {
        match syncra::next_frame(ws).await? {
            Some(Frame::SendResult { outcomes, .. }) => {
                anyhow::ensure!(
                    outcomes.iter().all(|o| o.outcome == Outcome::Delivered),
                    "the relay did not deliver a group's commit: {outcomes:?}"
                );
                return Ok(GroupId(group));
            }
            Some(Frame::Error { code, message, .. }) => {
                anyhow::bail!("the relay refused a group's commit: {code:?}: {message}")
            }
            Some(_) => {}
            None => anyhow::bail!("the relay closed the connection during a group's commit"),
        }
    }
}

/// A few application carriages for `group` in epoch 1, with MLS messages of `size` bytes of
/// filler, to be [`patched`] per message.
fn carriage_frames(group: GroupId, recipients: &[UserId], size: usize) -> Vec<Vec<u8>> {
    (0..POOL)
        .map(|i| {
            let carriage = CarriageHeader {
                message_id: [0; STAMP_LEN],
                kind: CarriageKind::Application,
                group_id: group,
                epoch: 1,
                recipients: recipients.to_vec(),
                members: Vec::new(),
            }
            .encode(&vec![i as u8; size.max(1)]);
            syncra::send_frame_bytes(0, carriage.into()).to_vec()
        })
        .collect()
}

/// Whether a delivery is an MLS commit (the carriage's kind follows its version byte and
/// message id).
fn is_commit(envelope: &[u8]) -> bool {
    envelope.first() == Some(&CARRIAGE_VERSION)
        && envelope.get(1 + STAMP_LEN) == Some(&CarriageKind::Commit.as_u8())
}

/// Registers every user on its server, then logs each in on a fresh connection.
async fn register_and_login(users: Vec<(LoadUser, String)>) -> anyhow::Result<Vec<(LoadUser, Ws)>> {
    let gate = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let mut set = JoinSet::new();
    for (i, (user, url)) in users.into_iter().enumerate() {
        let gate = gate.clone();
        set.spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let (ws, _token) = syncra::register(&user, &url, None).await?;
            syncra::close(ws).await;
            let ws = syncra::login(&user, &url, None).await?;
            anyhow::Ok((i, user, ws))
        });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.context("a setup task panicked")??);
    }
    out.sort_by_key(|(i, _, _)| *i);
    Ok(out.into_iter().map(|(_, u, w)| (u, w)).collect())
}

async fn run_syncra(config: LoadConfig) -> anyhow::Result<LoadReport> {
    let n = config.pairs;
    let k = config.recipients;
    let tag = syncra::run_tag();
    eprintln!(
        "syncra-load: registering and logging in {} users on {}",
        2 * n,
        config.urls.join(" ")
    );
    let mut users = Vec::with_capacity(2 * n);
    for i in 0..n {
        users.push((
            LoadUser::new("lds", &tag, i),
            sender_url(&config.urls, i).to_owned(),
        ));
    }
    for i in 0..n {
        users.push((
            LoadUser::new("ldr", &tag, i),
            receiver_url(&config.urls, i).to_owned(),
        ));
    }
    let setup_started = Instant::now();
    let mut sessions = register_and_login(users).await?;
    let receivers: Vec<(LoadUser, Ws)> = sessions.split_off(n);
    let senders = sessions;
    eprintln!(
        "syncra-load: {} sessions up in {:.1} s",
        2 * n,
        setup_started.elapsed().as_secs_f64()
    );

    let recipient_of: Vec<Recipient> = receivers.iter().map(|(u, _)| u.recipient()).collect();
    let sender_keys: Vec<(UserId, [u8; 32])> = senders
        .iter()
        .map(|(u, _)| (u.id(), u.identity.public()))
        .collect();

    let shared = Arc::new(Shared {
        base: Instant::now(),
        measure_from_ns: AtomicU64::new(u64::MAX),
        stop: AtomicBool::new(false),
        sent: AtomicU64::new(0),
        answered: AtomicU64::new(0),
        received: AtomicU64::new(0),
        senders: (0..n).map(|_| SenderSlot::default()).collect(),
    });
    let (start_tx, start_rx) = watch::channel(None);
    let (done_tx, done_rx) = watch::channel(false);

    // Receivers.
    let e2e = config.system == System::SyncraE2e;
    let mut receiver_tasks = JoinSet::new();
    for (r, (user, ws)) in receivers.into_iter().enumerate() {
        // The senders whose groups include this receiver, with their keys, for pinning.
        let pins: HashMap<UserId, [u8; 32]> =
            (0..k).map(|j| sender_keys[(r + n - j) % n]).collect();
        let shared = shared.clone();
        let done = done_rx.clone();
        receiver_tasks.spawn(syncra_receiver(user, ws, pins, e2e, shared, done));
    }

    // Senders.
    let mut sender_tasks = JoinSet::new();
    let mut wire_bytes = 0;
    for (s, (user, mut ws)) in senders.into_iter().enumerate() {
        let recipients: Vec<Recipient> = group_of(s, k, n).map(|r| recipient_of[r]).collect();
        let envelopes = if e2e {
            let probe = seal(
                &user.identity,
                &recipients,
                &vec![0u8; config.size],
                syncra_core::now_ms(),
            )?;
            wire_bytes = probe.bytes.len();
            Envelopes::Seal {
                identity: Box::new(user.identity),
                recipients,
                size: config.size,
            }
        } else {
            let frames = if config.system == System::SyncraMls {
                let ids: Vec<UserId> = recipients.iter().map(|r| r.user_id).collect();
                let group = create_group(&mut ws, user.id(), &ids).await?;
                carriage_frames(group, &ids, config.size)
            } else {
                pool_frames(&user.identity, &recipients, config.size)?
            };
            wire_bytes = frames[0].len() - SEND_MESSAGE_ID_AT + 1;
            Envelopes::Pool { frames, next: 0 }
        };
        let (sink, stream) = ws.split();
        let shared = shared.clone();
        let done = done_rx.clone();
        let start = start_rx.clone();
        let pacing = config.pacing;
        sender_tasks.spawn(async move {
            let reader = tokio::spawn(syncra_sender_reader(
                stream,
                s,
                k as i64,
                shared.clone(),
                done,
            ));
            let mut result = SenderResult::default();
            if let Err(e) = syncra_sender(
                s,
                sink,
                envelopes,
                &mut result,
                shared,
                pacing,
                k as i64,
                start,
            )
            .await
            {
                result.error = Some(format!("{e:#}"));
            }
            if let Ok(from_reader) = reader.await {
                merge_sender(&mut result, from_reader);
            }
            result
        });
    }
    let (first, second) = drive(&config, &shared, &start_tx, true).await?;
    let _ = done_tx.send(true);

    let mut hist = new_histogram();
    let mut totals = Totals::default();
    let mut errors = Vec::new();
    collect(&mut receiver_tasks, |r: ReceiverResult| {
        let _ = hist.add(&r.hist);
        totals.overflow_notices += r.overflow_notices;
        totals.open_failures += r.open_failures;
        if let Some(e) = r.error {
            errors.push(e);
        }
    })
    .await;
    let mut lag = None;
    collect(&mut sender_tasks, |r: SenderResult| {
        totals.skipped_by_generator += r.skipped;
        merge_lag(&mut lag, r.lag);
        totals.outcome_delivered += r.delivered;
        totals.outcome_offline += r.offline;
        for (k, v) in r.rejected {
            *totals.outcome_rejected.entry(k).or_default() += v;
        }
        for (k, v) in r.errors {
            *totals.send_errors.entry(k).or_default() += v;
        }
        if let Some(e) = r.error {
            errors.push(e);
        }
    })
    .await;
    totals.sent = shared.sent.load(Ordering::Acquire);
    totals.expected_deliveries = totals.sent * k as u64;
    totals.received = shared.received.load(Ordering::Acquire);
    let unanswered = totals
        .sent
        .saturating_sub(shared.answered.load(Ordering::Acquire));
    if unanswered > 0 {
        totals.send_errors.insert("no_answer".into(), unanswered);
    }
    totals.lost = totals.outcome_delivered.saturating_sub(totals.received);
    report_errors(&errors);
    let mode = match config.system {
        System::SyncraE2e => "e2e",
        System::SyncraMls => "mls",
        _ => "relay-only",
    };
    Ok(build_report(
        &config,
        "syncra",
        mode,
        wire_bytes,
        &first,
        &second,
        &hist,
        lag.as_ref(),
        totals,
    ))
}

fn record_lag(lag: &mut Option<Histogram<u64>>, ns: u64) {
    let h = lag.get_or_insert_with(new_histogram);
    let _ = h.record(ns.clamp(1, h.high()));
}

fn merge_lag(into: &mut Option<Histogram<u64>>, from: Option<Histogram<u64>>) {
    if let Some(from) = from {
        let _ = into.get_or_insert_with(new_histogram).add(&from);
    }
}

fn merge_sender(into: &mut SenderResult, from: SenderResult) {
    merge_lag(&mut into.lag, from.lag);
    into.delivered += from.delivered;
    into.offline += from.offline;
    for (k, v) in from.rejected {
        *into.rejected.entry(k).or_default() += v;
    }
    for (k, v) in from.errors {
        *into.errors.entry(k).or_default() += v;
    }
    if into.error.is_none() {
        into.error = from.error;
    }
}

fn report_errors(errors: &[String]) {
    if let Some(first) = errors.first() {
        eprintln!(
            "syncra-load: {} connection(s) failed during the run; first: {first}",
            errors.len()
        );
    }
}

/// Joins every task of a set (up to a deadline), passing results to `f`; aborts stragglers.
async fn collect<T: 'static>(set: &mut JoinSet<T>, mut f: impl FnMut(T)) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, set.join_next()).await {
            Ok(Some(Ok(r))) => f(r),
            Ok(Some(Err(_))) => {}
            Ok(None) => return,
            Err(_) => {
                eprintln!("syncra-load: {} task(s) did not finish in time", set.len());
                set.abort_all();
                return;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn syncra_sender(
    index: usize,
    mut sink: SplitSink<Ws, Message>,
    mut envelopes: Envelopes,
    result: &mut SenderResult,
    shared: Arc<Shared>,
    pacing: Pacing,
    k: i64,
    mut start: watch::Receiver<Option<Instant>>,
) -> anyhow::Result<()> {
    let Some(t0) = wait_start(&mut start).await else {
        return Ok(());
    };
    let senders = shared.senders.len();
    let slot = &shared.senders[index];
    let mut pace = Pace::new(pacing, k, t0, index, senders);
    tokio::time::sleep_until(t0.into()).await;
    let mut seq: u32 = 0;
    while let Some((count, at)) = pace.next(&shared, slot, k, &mut result.skipped).await {
        for _ in 0..count {
            let ns = shared.now_ns();
            if let Some(scheduled) = at {
                record_lag(&mut result.lag, ns.saturating_sub(scheduled));
            }
            seq = seq.wrapping_add(1);
            // Request ids are never 0 (0 means "no request" in the protocol).
            let frame = envelopes.frame(seq.max(1), stamp(index as u32, seq, ns))?;
            slot.outstanding.fetch_add(k, Ordering::AcqRel);
            shared.sent.fetch_add(1, Ordering::Relaxed);
            sink.feed(Message::Binary(frame)).await?;
        }
        sink.flush().await?;
    }
    Ok(())
}

/// Reads a sender's connection: send results and errors.
async fn syncra_sender_reader(
    mut stream: SplitStream<Ws>,
    index: usize,
    k: i64,
    shared: Arc<Shared>,
    mut done: watch::Receiver<bool>,
) -> SenderResult {
    let mut r = SenderResult::default();
    loop {
        let msg = tokio::select! {
            m = stream.next() => m,
            _ = done.wait_for(|d| *d) => break,
        };
        let bytes = match msg {
            Some(Ok(Message::Binary(b))) => b,
            Some(Ok(Message::Close(f))) => {
                r.error = Some(format!("sender connection closed: {f:?}"));
                break;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                r.error = Some(format!("sender connection failed: {e}"));
                break;
            }
            None => break,
        };
        match Frame::decode(&bytes, syncra::MAX_FRAME) {
            Ok(Frame::SendResult { outcomes, .. }) => {
                shared.answered.fetch_add(1, Ordering::AcqRel);
                let mut refused = 0;
                for o in outcomes {
                    match o.outcome {
                        Outcome::Delivered => r.delivered += 1,
                        // Stored in the mailbox: not delivered live, counted with offline.
                        Outcome::Offline | Outcome::Stored => {
                            r.offline += 1;
                            refused += 1;
                        }
                        Outcome::Rejected(code) => {
                            *r.rejected.entry(code.name().to_owned()).or_default() += 1;
                            refused += 1;
                        }
                    }
                }
                if refused > 0 {
                    shared.release(index, refused);
                }
            }
            Ok(Frame::Error {
                request_id, code, ..
            }) if request_id != 0 => {
                shared.answered.fetch_add(1, Ordering::AcqRel);
                *r.errors.entry(code.name().to_owned()).or_default() += 1;
                shared.release(index, k);
            }
            Ok(Frame::Error { code, .. }) => {
                *r.errors
                    .entry(format!("{}_notice", code.name()))
                    .or_default() += 1;
            }
            Ok(_) => {}
            Err(e) => {
                r.error = Some(format!("undecodable frame from the relay: {e}"));
            }
        }
    }
    r
}

async fn syncra_receiver(
    user: LoadUser,
    mut ws: Ws,
    pins: HashMap<UserId, [u8; 32]>,
    e2e: bool,
    shared: Arc<Shared>,
    mut done: watch::Receiver<bool>,
) -> ReceiverResult {
    let mut out = ReceiverResult {
        hist: new_histogram(),
        overflow_notices: 0,
        open_failures: 0,
        error: None,
    };
    let pinned = |id: &UserId| pins.get(id).copied();
    let me = user.id();
    let mut guard = ReplayGuard::new(AcceptWindow::default(), 1 << 20);
    loop {
        let frame = tokio::select! {
            f = syncra::next_frame(&mut ws) => f,
            _ = done.wait_for(|d| *d) => break,
        };
        match frame {
            Ok(Some(Frame::Deliver { envelope })) => {
                let stamp = if e2e {
                    // Built here, not held across an await: `Opener` borrows a non-Sync `dyn Fn`.
                    let opener = Opener {
                        me,
                        prekeys: &user.ring,
                        pinned: &pinned,
                    };
                    match opener.open(&envelope, &mut guard, syncra_core::now_ms()) {
                        Ok(m) => read_stamp(&m.body),
                        Err(_) => {
                            out.open_failures += 1;
                            continue;
                        }
                    }
                } else if is_commit(&envelope) {
                    // A group's creation before the run (SyncraMls).
                    continue;
                } else {
                    envelope.get(1..).and_then(read_stamp)
                };
                shared.received(stamp, &mut out.hist);
            }
            Ok(Some(Frame::Error {
                code: ErrorCode::QueueOverflow,
                ..
            })) => out.overflow_notices += 1,
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => {
                out.error = Some(format!("receiver: {e:#}"));
                break;
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// NATS

fn subject_of(sender: usize) -> String {
    format!("syncra_load.{sender}")
}

async fn run_nats(config: LoadConfig) -> anyhow::Result<LoadReport> {
    let n = config.pairs;
    let k = config.recipients;
    // The same bytes on the wire as a Syncra envelope of this body size to k recipients.
    let wire_bytes = syncra_envelope_len(config.size, k)?;
    eprintln!(
        "syncra-load: connecting {} NATS clients to {}",
        2 * n,
        config.urls.join(" ")
    );
    let gate = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let mut set = JoinSet::new();
    for i in 0..2 * n {
        let gate = gate.clone();
        let url = if i < n {
            sender_url(&config.urls, i).to_owned()
        } else {
            receiver_url(&config.urls, i - n).to_owned()
        };
        set.spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let mut conn = NatsConn::connect(&url, None, &format!("syncra-load-{i}")).await?;
            if i >= n {
                let r = i - n;
                for j in 0..k {
                    let s = (r + n - j) % n;
                    conn.subscribe(&subject_of(s), s as u64).await?;
                }
                conn.round_trip().await?;
            }
            anyhow::Ok((i, conn))
        });
    }
    let mut conns = Vec::new();
    while let Some(r) = set.join_next().await {
        conns.push(r.context("a setup task panicked")??);
    }
    conns.sort_by_key(|(i, _)| *i);
    let mut conns: Vec<NatsConn> = conns.into_iter().map(|(_, c)| c).collect();
    let receivers = conns.split_off(n);
    let senders = conns;

    let shared = Arc::new(Shared {
        base: Instant::now(),
        measure_from_ns: AtomicU64::new(u64::MAX),
        stop: AtomicBool::new(false),
        sent: AtomicU64::new(0),
        answered: AtomicU64::new(0),
        received: AtomicU64::new(0),
        senders: (0..n).map(|_| SenderSlot::default()).collect(),
    });
    let (start_tx, start_rx) = watch::channel(None);
    let (done_tx, done_rx) = watch::channel(false);

    let mut receiver_tasks = JoinSet::new();
    for conn in receivers {
        receiver_tasks.spawn(nats_receiver(conn, shared.clone(), done_rx.clone()));
    }
    let mut sender_tasks = JoinSet::new();
    for (s, conn) in senders.into_iter().enumerate() {
        let (sink, stream) = conn.ws.split();
        let sink = Arc::new(Mutex::new(sink));
        let shared = shared.clone();
        let done = done_rx.clone();
        let start = start_rx.clone();
        let pacing = config.pacing;
        sender_tasks.spawn(async move {
            let reader = tokio::spawn(nats_sender_reader(stream, conn.parser, sink.clone(), done));
            let mut result = SenderResult::default();
            if let Err(e) = nats_sender(
                s,
                sink,
                wire_bytes,
                &mut result,
                shared,
                pacing,
                k as i64,
                start,
            )
            .await
            {
                result.error = Some(format!("{e:#}"));
            }
            if let Ok(from_reader) = reader.await {
                merge_sender(&mut result, from_reader);
            }
            result
        });
    }

    let (first, second) = drive(&config, &shared, &start_tx, false).await?;
    let _ = done_tx.send(true);

    let mut hist = new_histogram();
    let mut totals = Totals::default();
    let mut errors = Vec::new();
    collect(&mut receiver_tasks, |r: ReceiverResult| {
        let _ = hist.add(&r.hist);
        if let Some(e) = r.error {
            errors.push(e);
        }
    })
    .await;
    let mut lag = None;
    collect(&mut sender_tasks, |r: SenderResult| {
        totals.skipped_by_generator += r.skipped;
        merge_lag(&mut lag, r.lag);
        for (k, v) in r.errors {
            *totals.send_errors.entry(k).or_default() += v;
        }
        if let Some(e) = r.error {
            errors.push(e);
        }
    })
    .await;
    totals.sent = shared.sent.load(Ordering::Acquire);
    totals.expected_deliveries = totals.sent * k as u64;
    totals.received = shared.received.load(Ordering::Acquire);
    totals.lost = totals.expected_deliveries.saturating_sub(totals.received);
    report_errors(&errors);
    Ok(build_report(
        &config,
        "nats",
        "pubsub",
        wire_bytes,
        &first,
        &second,
        &hist,
        lag.as_ref(),
        totals,
    ))
}

/// The size of a Syncra envelope with a body of `size` bytes to `k` recipients.
pub fn syncra_envelope_len(size: usize, k: usize) -> anyhow::Result<usize> {
    let sender = IdentityKeyPair::generate();
    let recipients: Vec<Recipient> = (0..k)
        .map(|_| LoadUser::new("probe", "x", 0).recipient())
        .collect();
    Ok(seal(
        &sender,
        &recipients,
        &vec![0u8; size],
        syncra_core::now_ms(),
    )?
    .bytes
    .len())
}

#[allow(clippy::too_many_arguments)]
async fn nats_sender(
    index: usize,
    sink: Arc<Mutex<SplitSink<Ws, Message>>>,
    payload_len: usize,
    result: &mut SenderResult,
    shared: Arc<Shared>,
    pacing: Pacing,
    k: i64,
    mut start: watch::Receiver<Option<Instant>>,
) -> anyhow::Result<()> {
    let Some(t0) = wait_start(&mut start).await else {
        return Ok(());
    };
    let senders = shared.senders.len();
    let slot = &shared.senders[index];
    let mut pace = Pace::new(pacing, k, t0, index, senders);
    let subject = subject_of(index);
    let mut payload = vec![0u8; payload_len.max(STAMP_LEN)];
    tokio::time::sleep_until(t0.into()).await;
    let mut seq: u32 = 0;
    while let Some((count, at)) = pace.next(&shared, slot, k, &mut result.skipped).await {
        let mut sink = sink.lock().await;
        for _ in 0..count {
            let ns = shared.now_ns();
            if let Some(scheduled) = at {
                record_lag(&mut result.lag, ns.saturating_sub(scheduled));
            }
            seq = seq.wrapping_add(1);
            payload[..STAMP_LEN].copy_from_slice(&stamp(index as u32, seq, ns));
            slot.outstanding.fetch_add(k, Ordering::AcqRel);
            shared.sent.fetch_add(1, Ordering::Relaxed);
            sink.feed(Message::Binary(nats::pub_bytes(&subject, &payload)))
                .await?;
        }
        sink.flush().await?;
    }
    Ok(())
}

async fn nats_sender_reader(
    mut stream: SplitStream<Ws>,
    mut parser: nats::Parser,
    sink: Arc<Mutex<SplitSink<Ws, Message>>>,
    mut done: watch::Receiver<bool>,
) -> SenderResult {
    let mut r = SenderResult::default();
    loop {
        let event = tokio::select! {
            e = nats::read_event(&mut stream, &mut parser) => e,
            _ = done.wait_for(|d| *d) => break,
        };
        match event {
            Ok(Some(Event::Ping)) => {
                let _ = sink
                    .lock()
                    .await
                    .send(Message::Binary(Bytes::from_static(b"PONG\r\n")))
                    .await;
            }
            Ok(Some(Event::Err(e))) => {
                *r.errors.entry(format!("-ERR {e}")).or_default() += 1;
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => {
                r.error = Some(format!("nats sender: {e:#}"));
                break;
            }
        }
    }
    r
}

async fn nats_receiver(
    mut conn: NatsConn,
    shared: Arc<Shared>,
    mut done: watch::Receiver<bool>,
) -> ReceiverResult {
    let mut out = ReceiverResult {
        hist: new_histogram(),
        overflow_notices: 0,
        open_failures: 0,
        error: None,
    };
    loop {
        let event = tokio::select! {
            e = nats::read_event(&mut conn.ws, &mut conn.parser) => e,
            _ = done.wait_for(|d| *d) => break,
        };
        match event {
            Ok(Some(Event::Msg { payload, .. })) => {
                shared.received(read_stamp(&payload), &mut out.hist);
            }
            Ok(Some(Event::Ping)) => {
                if let Err(e) = conn.send(Bytes::from_static(b"PONG\r\n")).await {
                    out.error = Some(format!("{e:#}"));
                    break;
                }
            }
            Ok(Some(Event::Err(e))) => {
                out.error = Some(format!("nats-server: {e}"));
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => {
                out.error = Some(format!("nats receiver: {e:#}"));
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip() {
        let s = stamp(7, 9, 123_456_789);
        assert_eq!(read_stamp(&s), Some((7, 123_456_789)));
        assert_eq!(read_stamp(&s[..15]), None);
    }

    #[test]
    fn groups_wrap_around() {
        assert_eq!(group_of(3, 3, 4).collect::<Vec<_>>(), vec![3, 0, 1]);
        let urls = vec!["a".to_owned(), "b".to_owned()];
        assert_ne!(sender_url(&urls, 0), receiver_url(&urls, 0));
        assert_ne!(sender_url(&urls, 1), receiver_url(&urls, 1));
    }

    #[test]
    fn pooled_frames_patch_request_and_message_id() {
        let sender = IdentityKeyPair::generate();
        let to = LoadUser::new("probe", "x", 1);
        let frames = pool_frames(&sender, &[to.recipient()], 256).unwrap();
        let mut env = Envelopes::Pool { frames, next: 0 };
        let bytes = env.frame(42, stamp(1, 2, 3)).unwrap();
        match Frame::decode(&bytes, syncra::MAX_FRAME).unwrap() {
            Frame::Send {
                request_id,
                envelope,
            } => {
                assert_eq!(request_id, 42);
                let header = syncra_core::crypto::envelope::parse_header(&envelope).unwrap();
                assert_eq!(&header.message_id, &stamp(1, 2, 3));
                assert_eq!(read_stamp(&envelope[1..]), Some((1, 3)));
            }
            other => panic!("not a send: {other:?}"),
        }
    }
}

//! The mailbox load: what holding messages for people who are away costs, next to delivering
//! them live, in one run against one relay.
//!
//! Method (written up in `docs/BENCHMARKS.md`, "Offline mailbox"):
//! 1. **Setup.** S senders and R recipients register; the recipients disconnect (they are away)
//!    and the senders log in. Sender `i` writes to recipient `i mod R`, with envelopes sealed
//!    ahead of time (a small pool per sender, each `Send` patched with its own request id and
//!    message id, as in the relay-only message load).
//! 2. **Store.** Every sender sends N messages, keeping at most W unanswered; each must be
//!    answered `stored`. Measured: messages per second from the first send to the last answer,
//!    and the CPU time the relay and the backend spent in that window per stored message.
//! 3. **Drain.** Every recipient logs in at once and reads its backlog up to `PendingEnd`,
//!    acknowledging each entry as it arrives (as the client does once a message is in its
//!    history). Measured: the time until every backlog has arrived, the time until every
//!    acknowledgement was processed (a ping after the last one; answers leave in request
//!    order), and CPU per drained message over the whole drain including the deletions.
//! 4. **Live.** With the recipients still connected, every sender sends N more messages, each
//!    answered `delivered`; measured like the store phase, until every delivery arrived.
//! 5. **Check.** Every recipient logs in again: an acknowledged backlog must be gone.
//!
//! CPU is read from `/proc` (`utime + stime`) for the relay's pids and for the backend's pids
//! with their child processes (PostgreSQL serves each connection in its own process); an
//! embedded SQLite mailbox is inside the relay's figure.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use syncra_core::wire::{Frame, Outcome};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

use crate::load::{patched, pool_frames, stamp};
use crate::procstat;
use crate::syncra::{self, LoadUser};
use crate::ws::Ws;

/// Handshakes run this many at a time.
const SETUP_CONCURRENCY: usize = 32;
/// Frames written before a flush.
const FLUSH_EVERY: usize = 64;
/// How long any phase may take before the run gives up.
const PHASE_DEADLINE: Duration = Duration::from_secs(600);

/// What to run.
#[derive(Clone, Debug)]
pub struct MailboxConfig {
    /// The relay's URL.
    pub url: String,
    /// Sending users.
    pub senders: usize,
    /// Recipients, away while the senders send.
    pub recipients: usize,
    /// Messages each sender sends in the store phase (and again in the live phase).
    pub messages: usize,
    /// Body size in bytes.
    pub size: usize,
    /// Unanswered sends per sender.
    pub window: usize,
    /// The relay's process ids.
    pub relay_pids: Vec<u32>,
    /// The backend's process ids (their child processes are counted too).
    pub backend_pids: Vec<u32>,
    /// A label for the report (the backend's name).
    pub label: String,
}

/// One phase's figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Phase {
    /// Messages the phase moved.
    pub messages: u64,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Messages per second.
    pub per_second: f64,
    /// Relay CPU seconds in the phase.
    pub relay_cpu_s: f64,
    /// Relay CPU microseconds per message.
    pub relay_cpu_us_per_msg: f64,
    /// Backend CPU seconds in the phase (0 for an embedded backend).
    pub backend_cpu_s: f64,
    /// Backend CPU microseconds per message.
    pub backend_cpu_us_per_msg: f64,
    /// Cores that other programs (not the relay, the backend or this generator) kept busy
    /// during the phase: a run on a busy machine says so here.
    pub other_cores_busy: f64,
}

/// The whole run.
#[derive(Clone, Debug, Serialize)]
pub struct MailboxReport {
    /// The label given (the backend).
    pub label: String,
    /// Senders, recipients, messages per sender, body size, window.
    pub senders: usize,
    /// Recipients.
    pub recipients: usize,
    /// Messages per sender and phase.
    pub messages_per_sender: usize,
    /// Body size.
    pub size: usize,
    /// Unanswered sends per sender.
    pub window: usize,
    /// Store phase: until the last `stored` answer.
    pub store: Phase,
    /// Answers other than `stored` in the store phase, by outcome.
    pub store_other_outcomes: BTreeMap<String, u64>,
    /// Drain phase: until every backlog arrived.
    pub drain: Phase,
    /// Until every acknowledgement was processed, seconds (CPU figures of `drain` cover this).
    pub drain_acknowledged_s: f64,
    /// The largest backlog one recipient drained, and how long that recipient took.
    pub largest_backlog: u64,
    /// Seconds from its login to its `PendingEnd`, for the recipient with the largest backlog.
    pub largest_backlog_s: f64,
    /// Live phase: until every delivery arrived.
    pub live: Phase,
    /// Answers other than `delivered` in the live phase, by outcome.
    pub live_other_outcomes: BTreeMap<String, u64>,
    /// Entries a fresh login found after the drain was acknowledged (must be 0).
    pub left_after_drain: u64,
}

/// CPU readings of the relay and the backend.
#[derive(Clone, Copy)]
struct Cpu {
    at: Instant,
    relay: f64,
    backend: f64,
    /// This generator's own CPU.
    generator: f64,
    /// Every processor's busy time.
    machine: f64,
}

impl Cpu {
    fn now(config: &MailboxConfig) -> anyhow::Result<Cpu> {
        Ok(Cpu {
            at: Instant::now(),
            relay: procstat::cpu_seconds_all(&config.relay_pids)?,
            backend: procstat::cpu_seconds_tree(&config.backend_pids),
            generator: procstat::cpu_seconds(procstat::self_pid())?,
            machine: procstat::machine_busy_seconds()?,
        })
    }

    /// The phase from `self` to `end` (whose time may be earlier than the CPU reading, when
    /// the phase ended before a last bit of work that still belongs to it was waited for).
    fn phase(self, end: Cpu, seconds: f64, messages: u64) -> Phase {
        let relay = (end.relay - self.relay).max(0.0);
        let backend = (end.backend - self.backend).max(0.0);
        let generator = (end.generator - self.generator).max(0.0);
        let window = (end.at - self.at).as_secs_f64();
        let others = (end.machine - self.machine - relay - backend - generator).max(0.0);
        let per = |cpu: f64| {
            if messages == 0 {
                0.0
            } else {
                cpu * 1e6 / messages as f64
            }
        };
        Phase {
            messages,
            seconds,
            per_second: if seconds > 0.0 {
                messages as f64 / seconds
            } else {
                0.0
            },
            relay_cpu_s: relay,
            relay_cpu_us_per_msg: per(relay),
            backend_cpu_s: backend,
            backend_cpu_us_per_msg: per(backend),
            other_cores_busy: if window > 0.0 { others / window } else { 0.0 },
        }
    }
}

fn outcome_name(o: Outcome) -> String {
    match o {
        Outcome::Delivered => "delivered".into(),
        Outcome::Stored => "stored".into(),
        Outcome::Offline => "offline".into(),
        Outcome::Rejected(code) => format!("rejected:{}", code.name()),
    }
}

/// Runs the whole method against `config.url`.
pub async fn run(config: MailboxConfig) -> anyhow::Result<MailboxReport> {
    if config.senders == 0 || config.recipients == 0 || config.messages == 0 {
        bail!("--senders, --recipients and --messages must be above 0");
    }
    procstat::check_pids(&config.relay_pids)?;
    procstat::check_pids(&config.backend_pids)?;
    let url = config.url.clone();
    eprintln!(
        "syncra-load mailbox ({}): {} senders → {} recipients, {} messages each, {} bytes",
        config.label, config.senders, config.recipients, config.messages, config.size
    );
    let recipients: Vec<Arc<LoadUser>> = syncra::register_many(
        "mbr",
        config.recipients,
        SETUP_CONCURRENCY,
        |_| url.clone(),
        |_| None,
    )
    .await?
    .into_iter()
    .map(|(u, _)| Arc::new(u))
    .collect();
    let senders = syncra::register_many(
        "mbs",
        config.senders,
        SETUP_CONCURRENCY,
        |_| url.clone(),
        |_| None,
    )
    .await?;
    let mut templates = Vec::with_capacity(senders.len());
    let mut sessions = Vec::with_capacity(senders.len());
    for (i, (sender, _)) in senders.iter().enumerate() {
        let to = &recipients[i % recipients.len()];
        templates.push(Arc::new(pool_frames(
            &sender.identity,
            &[to.recipient()],
            config.size,
        )?));
        sessions.push(syncra::login(sender, &url, None).await?);
    }

    // Store.
    eprintln!("syncra-load mailbox: store phase");
    let before = Cpu::now(&config)?;
    let Sent {
        sessions,
        outcomes: store_outcomes,
        end: store_end,
        ..
    } = send_all(sessions, &templates, &config, Outcome::Stored).await?;
    let after_store = Cpu::now(&config)?;
    let stored = store_outcomes.get("stored").copied().unwrap_or(0);
    let store = before.phase(after_store, (store_end - before.at).as_secs_f64(), stored);

    // Drain.
    eprintln!("syncra-load mailbox: drain phase ({stored} entries)");
    let drain_start = Cpu::now(&config)?;
    let mut set = JoinSet::new();
    for (i, user) in recipients.iter().enumerate() {
        let (url, user) = (url.clone(), Arc::clone(user));
        set.spawn(async move {
            let began = Instant::now();
            let mut ws = syncra::login(&user, &url, None).await?;
            let (count, backlog_at) = drain_backlog(&mut ws).await?;
            anyhow::Ok((i, ws, count, began, backlog_at, Instant::now()))
        });
    }
    let mut receivers: Vec<(usize, Ws)> = Vec::new();
    let (mut drained, mut backlog_end, mut acked_end) = (0u64, drain_start.at, drain_start.at);
    let (mut largest, mut largest_s) = (0u64, 0.0);
    while let Some(r) = set.join_next().await {
        let (i, ws, count, began, backlog_at, acked_at) = r.context("a drain task panicked")??;
        drained += count;
        backlog_end = backlog_end.max(backlog_at);
        acked_end = acked_end.max(acked_at);
        if count >= largest {
            largest = count;
            largest_s = (backlog_at - began).as_secs_f64();
        }
        receivers.push((i, ws));
    }
    let after_drain = Cpu::now(&config)?;
    let drain = drain_start.phase(
        after_drain,
        (backlog_end - drain_start.at).as_secs_f64(),
        drained,
    );
    if drained != stored {
        eprintln!("syncra-load mailbox: WARNING: {stored} stored but {drained} drained");
    }

    // Live.
    eprintln!("syncra-load mailbox: live phase");
    receivers.sort_by_key(|(i, _)| *i);
    let live_start = Cpu::now(&config)?;
    // How many deliveries each recipient is owed is known only from the answers (a session
    // whose queue is full refuses, and its sender is told): the receivers learn it at the end.
    let (owed_tx, owed_rx) = tokio::sync::watch::channel(None::<Vec<u64>>);
    let mut readers = JoinSet::new();
    for (i, ws) in receivers {
        readers.spawn(receive_live(ws, i, owed_rx.clone()));
    }
    let live_sent = send_all(sessions, &templates, &config, Outcome::Delivered).await?;
    let mut owed = vec![0u64; recipients.len()];
    for (i, outcomes) in live_sent.per_sender.iter().enumerate() {
        owed[i % recipients.len()] += outcomes.get("delivered").copied().unwrap_or(0);
    }
    let _ = owed_tx.send(Some(owed));
    let live_outcomes = live_sent.outcomes;
    let mut live_received = 0;
    let mut live_end = live_start.at;
    while let Some(r) = readers.join_next().await {
        let (n, at) = r.context("a live receiver panicked")??;
        live_received += n;
        live_end = live_end.max(at);
    }
    let after_live = Cpu::now(&config)?;
    let live = live_start.phase(
        after_live,
        (live_end - live_start.at).as_secs_f64(),
        live_received,
    );

    // Check.
    let mut left = 0;
    for user in &recipients {
        let mut ws = syncra::login(user, &url, None).await?;
        left += drain_backlog(&mut ws).await?.0;
        syncra::close(ws).await;
    }

    let others = |m: &BTreeMap<String, u64>, want: &str| {
        m.iter()
            .filter(|(k, _)| k.as_str() != want)
            .map(|(k, v)| (k.clone(), *v))
            .collect::<BTreeMap<_, _>>()
    };
    Ok(MailboxReport {
        label: config.label.clone(),
        senders: config.senders,
        recipients: config.recipients,
        messages_per_sender: config.messages,
        size: config.size,
        window: config.window,
        store,
        store_other_outcomes: others(&store_outcomes, "stored"),
        drain,
        drain_acknowledged_s: (acked_end - drain_start.at).as_secs_f64(),
        largest_backlog: largest,
        largest_backlog_s: largest_s,
        live,
        live_other_outcomes: others(&live_outcomes, "delivered"),
        left_after_drain: left,
    })
}

/// Every sender sends `config.messages` messages with at most `config.window` unanswered.
/// Returns the connections (for another phase), the outcomes by name, and when the last
/// answer arrived.
async fn send_all(
    sessions: Vec<Ws>,
    templates: &[Arc<Vec<Vec<u8>>>],
    config: &MailboxConfig,
    expect: Outcome,
) -> anyhow::Result<Sent> {
    let mut set = JoinSet::new();
    for (i, ws) in sessions.into_iter().enumerate() {
        let pool = Arc::clone(&templates[i]);
        let (n, window) = (config.messages, config.window.max(1));
        set.spawn(async move {
            let (ws, outcomes, end) = send_one(i as u32, ws, pool, n, window).await?;
            anyhow::Ok((i, ws, outcomes, end))
        });
    }
    let mut all = BTreeMap::new();
    let mut out = Vec::new();
    let mut end = Instant::now();
    let mut first = true;
    while let Some(r) = set.join_next().await {
        let (i, ws, outcomes, at) = r.context("a sender panicked")??;
        for (k, v) in &outcomes {
            *all.entry(k.clone()).or_insert(0) += v;
        }
        end = if first { at } else { end.max(at) };
        first = false;
        out.push((i, ws, outcomes));
    }
    out.sort_by_key(|(i, _, _)| *i);
    let unexpected: u64 = all
        .iter()
        .filter(|(k, _)| **k != outcome_name(expect))
        .map(|(_, v)| v)
        .sum();
    if unexpected > 0 {
        eprintln!("syncra-load mailbox: WARNING: unexpected outcomes {all:?}");
    }
    let mut sessions = Vec::with_capacity(out.len());
    let mut per_sender = Vec::with_capacity(out.len());
    for (_, ws, outcomes) in out {
        sessions.push(ws);
        per_sender.push(outcomes);
    }
    Ok(Sent {
        sessions,
        outcomes: all,
        per_sender,
        end,
    })
}

/// What a sending phase did.
struct Sent {
    /// The senders' connections, for another phase.
    sessions: Vec<Ws>,
    /// Outcomes by name, over every sender.
    outcomes: BTreeMap<String, u64>,
    /// Outcomes by name, per sender (in sender order).
    per_sender: Vec<BTreeMap<String, u64>>,
    /// When the last answer arrived.
    end: Instant,
}

/// One sender: `n` sends, at most `window` unanswered.
async fn send_one(
    index: u32,
    ws: Ws,
    pool: Arc<Vec<Vec<u8>>>,
    n: usize,
    window: usize,
) -> anyhow::Result<(Ws, BTreeMap<String, u64>, Instant)> {
    let (mut sink, mut stream) = ws.split();
    let room = Arc::new(Semaphore::new(window));
    let writer_room = Arc::clone(&room);
    let writer = tokio::spawn(async move {
        let base = Instant::now();
        for seq in 1..=n {
            let permit = writer_room.acquire().await.context("window closed")?;
            permit.forget();
            let ns = base.elapsed().as_nanos() as u64;
            let frame = patched(
                &pool[seq % pool.len()],
                seq as u32,
                stamp(index, seq as u32, ns),
            );
            sink.feed(Message::Binary(frame)).await?;
            if seq.is_multiple_of(FLUSH_EVERY) || writer_room.available_permits() == 0 {
                sink.flush().await?;
            }
        }
        sink.flush().await?;
        anyhow::Ok(sink)
    });
    let mut outcomes = BTreeMap::new();
    let mut answered = 0;
    let deadline = tokio::time::Instant::now() + PHASE_DEADLINE;
    while answered < n {
        let msg = tokio::time::timeout_at(deadline, stream.next())
            .await
            .context("the relay did not answer every send in time")?;
        let bytes = match msg {
            Some(Ok(Message::Binary(b))) => b,
            Some(Ok(Message::Close(f))) => bail!("sender connection closed: {f:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => bail!("sender connection failed: {e}"),
            None => bail!("sender connection closed"),
        };
        match Frame::decode(&bytes, syncra::MAX_FRAME)? {
            Frame::SendResult { outcomes: o, .. } => {
                for r in o {
                    *outcomes.entry(outcome_name(r.outcome)).or_insert(0) += 1;
                }
                answered += 1;
                room.add_permits(1);
            }
            Frame::Error {
                request_id, code, ..
            } if request_id != 0 => {
                *outcomes
                    .entry(format!("error:{}", code.name()))
                    .or_insert(0) += 1;
                answered += 1;
                room.add_permits(1);
            }
            _ => {}
        }
    }
    let end = Instant::now();
    let sink = writer.await.context("a sender's writer panicked")??;
    let ws = sink
        .reunite(stream)
        .map_err(|_| anyhow::anyhow!("could not rejoin a sender's connection"))?;
    Ok((ws, outcomes, end))
}

/// Reads the login backlog to `PendingEnd`, acknowledging every entry as it arrives, then
/// waits until the acknowledgements were processed. Returns the count and when the backlog had
/// arrived.
async fn drain_backlog(ws: &mut Ws) -> anyhow::Result<(u64, Instant)> {
    let deadline = tokio::time::Instant::now() + PHASE_DEADLINE;
    let mut count = 0u64;
    let arrived = loop {
        let frame = tokio::time::timeout_at(deadline, syncra::next_frame(ws))
            .await
            .context("the backlog did not arrive in time")??
            .context("the relay closed the connection during the backlog")?;
        match frame {
            Frame::Pending { entry_id, .. } => {
                count += 1;
                ws.feed(Message::Binary(Frame::Acknowledge { entry_id }.encode()))
                    .await?;
                if count.is_multiple_of(FLUSH_EVERY as u64) {
                    ws.flush().await?;
                }
            }
            Frame::PendingEnd { count: said } => {
                if u64::from(said) != count {
                    bail!("PendingEnd says {said} but {count} entries arrived");
                }
                break Instant::now();
            }
            other => bail!("expected the backlog, got {}", other.kind()),
        }
    };
    // Answers leave in request order: once the pong is here, every acknowledgement before it
    // was processed.
    syncra::send_frame(ws, &Frame::Ping { nonce: 1 }).await?;
    loop {
        match tokio::time::timeout_at(deadline, syncra::next_frame(ws))
            .await
            .context("no pong in time")??
        {
            Some(Frame::Pong { nonce: 1 }) => return Ok((count, arrived)),
            Some(_) => {}
            None => bail!("the relay closed the connection before the pong"),
        }
    }
}

/// Reads live deliveries until as many arrived as recipient `index` is owed (known once every
/// sender has its answers); returns how many arrived and when the last did.
async fn receive_live(
    mut ws: Ws,
    index: usize,
    mut owed: tokio::sync::watch::Receiver<Option<Vec<u64>>>,
) -> anyhow::Result<(u64, Instant)> {
    let deadline = tokio::time::Instant::now() + PHASE_DEADLINE;
    let mut got = 0;
    let mut last = Instant::now();
    let mut want: Option<u64> = None;
    while want.is_none_or(|w| got < w) {
        let frame = tokio::select! {
            f = tokio::time::timeout_at(deadline, syncra::next_frame(&mut ws)) => {
                f.context("live deliveries did not arrive in time")??
            }
            changed = owed.changed(), if want.is_none() => {
                changed.context("the senders stopped")?;
                want = owed.borrow().as_ref().map(|o| o.get(index).copied().unwrap_or(0));
                continue;
            }
        };
        match frame {
            Some(Frame::Deliver { .. }) => {
                got += 1;
                last = Instant::now();
            }
            Some(_) => {}
            None => bail!("the relay closed a recipient's connection"),
        }
    }
    syncra::close(ws).await;
    Ok((got, last))
}

impl MailboxReport {
    /// A human-readable summary.
    pub fn table(&self) -> String {
        let row = |name: &str, p: &Phase| {
            format!(
                "{name:<6} {:>8} msgs {:>8.3} s {:>10.0} msg/s   relay {:>7.1} µs/msg   backend {:>7.1} µs/msg   others {:.2} cores\n",
                p.messages,
                p.seconds,
                p.per_second,
                p.relay_cpu_us_per_msg,
                p.backend_cpu_us_per_msg,
                p.other_cores_busy
            )
        };
        let mut out = format!(
            "mailbox load ({}): {} senders → {} recipients, {} messages each, {} bytes, window {}\n",
            self.label,
            self.senders,
            self.recipients,
            self.messages_per_sender,
            self.size,
            self.window
        );
        out += &row("store", &self.store);
        out += &row("drain", &self.drain);
        out += &row("live", &self.live);
        out += &format!(
            "drain acknowledged after {:.3} s; largest backlog {} arrived in {:.3} s; left after drain: {}\n",
            self.drain_acknowledged_s,
            self.largest_backlog,
            self.largest_backlog_s,
            self.left_after_drain
        );
        if !self.store_other_outcomes.is_empty() || !self.live_other_outcomes.is_empty() {
            out += &format!(
                "unexpected outcomes: store {:?}, live {:?}\n",
                self.store_other_outcomes, self.live_other_outcomes
            );
        }
        out
    }
}

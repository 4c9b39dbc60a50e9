//! Soak: many connections, steady traffic and churn for a long time; the relay's memory over
//! time.
//!
//! Method: register K users (64 at a time), seal one envelope per user to the next user
//! (relay-only: receivers do not open), then keep K sessions logged in. Every session sends its
//! envelope on its own fixed schedule (K / rate seconds apart, phases spread), so the total is
//! `rate` messages per second. Churn: each session lives for an exponentially distributed time
//! with mean K / churn seconds, then closes and logs in again with a signed challenge (the
//! store is read, a new session and broker subscription are made), so about `churn` sessions
//! per second are replaced — the reconnect storm of a mobile population, in miniature. Every
//! `interval` the tool samples the relay's RSS and CPU from `/proc` and the traffic counters,
//! prints a line, and at the end reports the samples, the growth of RSS from the first sample
//! to the last, and the slope over the second half (a leak shows as a slope that does not
//! flatten).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::SinkExt;
use serde::{Deserialize, Serialize};
use syncra_core::crypto::envelope::seal;
use syncra_core::wire::{Frame, Outcome};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

use crate::procstat;
use crate::syncra::{self, LoadUser};

/// Registrations at a time.
const REGISTER_CONCURRENCY: usize = 64;
/// Logins at a time while the sessions first open.
const LOGIN_CONCURRENCY: usize = 128;
/// Pause before a session that failed to log in tries again.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// Ports one loopback source address may use; churn leaves sockets in TIME_WAIT for a minute.
const PORTS_PER_SOURCE: usize = 20_000;

/// What to run.
#[derive(Clone, Debug)]
pub struct SoakConfig {
    /// Relay URLs (sessions are spread round-robin).
    pub urls: Vec<String>,
    /// Sessions kept open.
    pub connections: usize,
    /// Messages per second in total.
    pub rate: f64,
    /// Sessions replaced per second, on average.
    pub churn: f64,
    /// How long to run.
    pub duration: Duration,
    /// Time between samples.
    pub interval: Duration,
    /// Body size in bytes.
    pub size: usize,
    /// Relay pids to sample.
    pub pids: Vec<u32>,
}

/// One sample.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SoakSample {
    /// Seconds since the sessions were all open.
    pub t_s: f64,
    /// Relay RSS, KiB (summed over the pids).
    pub rss_kib: u64,
    /// Relay CPU cores used since the previous sample.
    pub relay_cores: f64,
    /// Sessions logged in at this moment.
    pub sessions: i64,
    /// Messages sent since the previous sample.
    pub sent: u64,
    /// Deliveries received since the previous sample.
    pub received: u64,
    /// Sessions replaced (closed and logged in again) since the previous sample.
    pub reconnects: u64,
}

/// A soak run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SoakReport {
    /// Relay URLs.
    pub urls: Vec<String>,
    /// Sessions kept open.
    pub connections: usize,
    /// Messages per second asked for.
    pub rate: f64,
    /// Reconnections per second asked for.
    pub churn: f64,
    /// Seconds run.
    pub duration_s: f64,
    /// Body size.
    pub size: usize,
    /// Relay pids sampled.
    pub pids: Vec<u32>,
    /// Relay RSS before any session opened (users registered), KiB.
    pub rss_idle_kib: u64,
    /// The samples.
    pub samples: Vec<SoakSample>,
    /// RSS of the first sample, KiB.
    pub rss_first_kib: u64,
    /// RSS of the last sample, KiB.
    pub rss_last_kib: u64,
    /// Highest sampled RSS, KiB.
    pub rss_max_kib: u64,
    /// Least-squares slope of RSS over the second half of the run, KiB per minute.
    pub rss_slope_second_half_kib_per_min: f64,
    /// Messages sent.
    pub sent: u64,
    /// `delivered` outcomes.
    pub delivered: u64,
    /// `offline` outcomes (the recipient was between sessions).
    pub offline: u64,
    /// Rejected outcomes and error replies.
    pub rejected: u64,
    /// Deliveries received.
    pub received: u64,
    /// Sessions replaced on schedule.
    pub reconnects: u64,
    /// Sessions that ended without being asked to (the relay closed them or the connection
    /// failed), then logged in again.
    pub unexpected_closes: u64,
    /// Logins that failed (and were retried).
    pub login_failures: u64,
    /// The first failure's message.
    pub first_error: Option<String>,
}

#[derive(Default)]
struct Counters {
    sessions: AtomicI64,
    sent: AtomicU64,
    delivered: AtomicU64,
    offline: AtomicU64,
    rejected: AtomicU64,
    received: AtomicU64,
    reconnects: AtomicU64,
    unexpected: AtomicU64,
    login_failures: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

impl Counters {
    fn error(&self, e: &anyhow::Error) {
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert_with(|| format!("{e:#}"));
    }
}

/// A uniform random number in [0, 1).
fn uniform() -> f64 {
    let mut b = [0u8; 8];
    syncra_core::crypto::fill_random(&mut b);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// An exponentially distributed lifetime with the given mean.
fn lifetime(mean_s: f64) -> Duration {
    if !mean_s.is_finite() {
        return Duration::from_secs(365 * 24 * 3600);
    }
    Duration::from_secs_f64(-mean_s * (1.0 - uniform()).ln())
}

/// The least-squares slope of `(x, y)` points, y per x.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 { 0.0 } else { sxy / sxx }
}

struct Session {
    user: Arc<LoadUser>,
    url: String,
    source: Option<IpAddr>,
    frame: Bytes,
    period: Duration,
    phase: Duration,
    mean_life_s: f64,
}

/// Runs one session slot until `stop`: log in, send on schedule, count what arrives, and
/// replace the session when its lifetime ends.
async fn session_slot(
    s: Session,
    counters: Arc<Counters>,
    gate: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let mut first = true;
    let mut next_send = tokio::time::Instant::now() + s.phase;
    loop {
        if *stop.borrow() {
            return;
        }
        let login = {
            // Only the first logins are paced; churn logins go as they come.
            let _permit = if first {
                gate.acquire().await.ok()
            } else {
                None
            };
            syncra::login(&s.user, &s.url, s.source).await
        };
        let mut ws = match login {
            Ok(ws) => ws,
            Err(e) => {
                counters.login_failures.fetch_add(1, Ordering::Relaxed);
                counters.error(&e);
                tokio::select! {
                    () = tokio::time::sleep(RETRY_PAUSE) => continue,
                    _ = stop.changed() => return,
                }
            }
        };
        first = false;
        counters.sessions.fetch_add(1, Ordering::Relaxed);
        let until = tokio::time::Instant::now() + lifetime(s.mean_life_s);
        let ended = loop {
            tokio::select! {
                _ = stop.changed() => break None,
                () = tokio::time::sleep_until(until) => break Some(true),
                () = tokio::time::sleep_until(next_send) => {
                    next_send += s.period;
                    if ws.send(Message::Binary(s.frame.clone())).await.is_err() {
                        break Some(false);
                    }
                    counters.sent.fetch_add(1, Ordering::Relaxed);
                }
                frame = syncra::next_frame(&mut ws) => match frame {
                    Ok(Some(Frame::Deliver { .. })) => {
                        counters.received.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Some(Frame::SendResult { outcomes, .. })) => {
                        for o in outcomes {
                            let c = match o.outcome {
                                Outcome::Delivered => &counters.delivered,
                                Outcome::Offline | Outcome::Stored => &counters.offline,
                                Outcome::Rejected(_) => &counters.rejected,
                            };
                            c.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(Some(Frame::Error { .. })) => {
                        counters.rejected.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break Some(false),
                    Err(e) => {
                        counters.error(&e);
                        break Some(false);
                    }
                },
            }
        };
        counters.sessions.fetch_sub(1, Ordering::Relaxed);
        syncra::close(ws).await;
        match ended {
            None => return,
            Some(true) => counters.reconnects.fetch_add(1, Ordering::Relaxed),
            Some(false) => counters.unexpected.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// Runs the soak scenario, printing a line per sample to stderr.
pub async fn run(config: SoakConfig) -> anyhow::Result<SoakReport> {
    let k = config.connections;
    if k < 2 {
        bail!("--connections must be at least 2 (each user sends to the next)");
    }
    if config.urls.is_empty() {
        bail!("give at least one --url");
    }
    if config.rate.is_nan() || config.rate <= 0.0 || config.churn.is_nan() || config.churn < 0.0 {
        bail!("--rate must be positive and --churn not negative");
    }
    if config.interval.is_zero() {
        bail!("--interval must be positive");
    }
    procstat::check_pids(&config.pids)?;
    let limit = procstat::raise_nofile();
    // Live sessions plus the sockets churn opens while old ones close.
    let need = k as u64 + (config.churn * 10.0) as u64 + 256;
    if limit < need {
        bail!(
            "this process may open only {limit} files (RLIMIT_NOFILE hard limit) but {k} \
             sessions need about {need}; raise the hard limit or ask for fewer connections"
        );
    }
    // Ports in use: the sessions, plus a minute of churned sockets in TIME_WAIT.
    let ports = k + (config.churn * 60.0) as usize;
    let sources = ports.div_ceil(PORTS_PER_SOURCE).clamp(1, 250);
    let source_of = |i: usize| {
        (sources > 1).then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % sources) as u8)))
    };

    eprintln!("syncra-load soak: registering {k} users");
    let url_of = |i: usize| config.urls[i % config.urls.len()].clone();
    let users: Vec<Arc<LoadUser>> =
        syncra::register_many("lds", k, REGISTER_CONCURRENCY, &url_of, &source_of)
            .await?
            .into_iter()
            .map(|(user, _)| Arc::new(user))
            .collect();

    eprintln!("syncra-load soak: sealing one envelope per user");
    let body = vec![0x5a; config.size];
    let now = syncra_core::now_ms();
    let mut frames = Vec::with_capacity(k);
    for (i, user) in users.iter().enumerate() {
        let to = users[(i + 1) % k].recipient();
        let sealed = seal(&user.identity, &[to], &body, now).context("sealing")?;
        frames.push(syncra::send_frame_bytes(
            i as u32,
            Bytes::from(sealed.bytes),
        ));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = procstat::memory_all(&config.pids).rss_kib;

    eprintln!(
        "syncra-load soak: opening {k} sessions; then {:.0} msg/s and {:.1} reconnects/s for {:.0} s",
        config.rate,
        config.churn,
        config.duration.as_secs_f64()
    );
    let counters = Arc::new(Counters::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let gate = Arc::new(Semaphore::new(LOGIN_CONCURRENCY));
    let period = Duration::from_secs_f64(k as f64 / config.rate);
    let mean_life_s = if config.churn > 0.0 {
        k as f64 / config.churn
    } else {
        f64::INFINITY
    };
    let mut slots = JoinSet::new();
    for (i, (user, frame)) in users.iter().zip(frames).enumerate() {
        let session = Session {
            user: user.clone(),
            url: url_of(i),
            source: source_of(i + 1),
            frame,
            period,
            phase: period.mul_f64(i as f64 / k as f64),
            mean_life_s,
        };
        slots.spawn(session_slot(
            session,
            counters.clone(),
            gate.clone(),
            stop_rx.clone(),
        ));
    }
    let open_deadline = Instant::now() + Duration::from_secs(120);
    while counters.sessions.load(Ordering::Relaxed) < k as i64 * 95 / 100 {
        if Instant::now() > open_deadline {
            bail!(
                "only {} of {k} sessions opened within 120 s; first error: {}",
                counters.sessions.load(Ordering::Relaxed),
                counters
                    .first_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
                    .unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let started = Instant::now();
    let mut samples = Vec::new();
    let mut last = (0u64, 0u64, 0u64);
    let mut last_cpu = procstat::cpu_seconds_all(&config.pids)?;
    let mut last_t = started;
    eprintln!("     t      RSS KiB   relay cores   sessions    sent/s   received/s  reconnects/s");
    loop {
        let next = last_t + config.interval;
        let end = started + config.duration;
        tokio::time::sleep_until(next.min(end).into()).await;
        let now = Instant::now();
        let dt = now.duration_since(last_t).as_secs_f64().max(1e-9);
        let cpu = procstat::cpu_seconds_all(&config.pids)?;
        let totals = (
            counters.sent.load(Ordering::Relaxed),
            counters.received.load(Ordering::Relaxed),
            counters.reconnects.load(Ordering::Relaxed)
                + counters.unexpected.load(Ordering::Relaxed),
        );
        let sample = SoakSample {
            t_s: now.duration_since(started).as_secs_f64(),
            rss_kib: procstat::memory_all(&config.pids).rss_kib,
            relay_cores: (cpu - last_cpu) / dt,
            sessions: counters.sessions.load(Ordering::Relaxed),
            sent: totals.0 - last.0,
            received: totals.1 - last.1,
            reconnects: totals.2 - last.2,
        };
        eprintln!(
            "{:>6.0}s {:>12} {:>13.2} {:>10} {:>9.0} {:>12.0} {:>13.1}",
            sample.t_s,
            sample.rss_kib,
            sample.relay_cores,
            sample.sessions,
            sample.sent as f64 / dt,
            sample.received as f64 / dt,
            sample.reconnects as f64 / dt
        );
        samples.push(sample);
        last = totals;
        last_cpu = cpu;
        last_t = now;
        if now >= end {
            break;
        }
    }
    let duration_s = started.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    while slots.join_next().await.is_some() {}

    let half: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.t_s >= duration_s / 2.0)
        .map(|s| (s.t_s / 60.0, s.rss_kib as f64))
        .collect();
    let c = &counters;
    Ok(SoakReport {
        urls: config.urls.clone(),
        connections: k,
        rate: config.rate,
        churn: config.churn,
        duration_s,
        size: config.size,
        pids: config.pids.clone(),
        rss_idle_kib: rss_idle,
        rss_first_kib: samples.first().map_or(0, |s| s.rss_kib),
        rss_last_kib: samples.last().map_or(0, |s| s.rss_kib),
        rss_max_kib: samples.iter().map(|s| s.rss_kib).max().unwrap_or(0),
        rss_slope_second_half_kib_per_min: slope(&half),
        samples,
        sent: c.sent.load(Ordering::Relaxed),
        delivered: c.delivered.load(Ordering::Relaxed),
        offline: c.offline.load(Ordering::Relaxed),
        rejected: c.rejected.load(Ordering::Relaxed),
        received: c.received.load(Ordering::Relaxed),
        reconnects: c.reconnects.load(Ordering::Relaxed),
        unexpected_closes: c.unexpected.load(Ordering::Relaxed),
        login_failures: c.login_failures.load(Ordering::Relaxed),
        first_error: c
            .first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
    })
}

impl SoakReport {
    /// The human-readable summary.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mut row = |k: &str, v: String| out.push_str(&format!("  {k:<36} {v}\n"));
        row("relay", self.urls.join(" "));
        row(
            "load",
            format!(
                "{} sessions, {:.0} msg/s of {} B, {:.1} reconnects/s, {:.0} s",
                self.connections, self.rate, self.size, self.churn, self.duration_s
            ),
        );
        row(
            "sent / delivered / received",
            format!("{} / {} / {}", self.sent, self.delivered, self.received),
        );
        row(
            "offline / rejected outcomes",
            format!("{} / {}", self.offline, self.rejected),
        );
        row(
            "reconnects (scheduled / unexpected)",
            format!("{} / {}", self.reconnects, self.unexpected_closes),
        );
        row(
            "login failures",
            format!(
                "{}{}",
                self.login_failures,
                self.first_error
                    .as_ref()
                    .map(|e| format!(" (first: {e})"))
                    .unwrap_or_default()
            ),
        );
        let mib = |kib: u64| kib as f64 / 1024.0;
        row(
            "relay RSS idle / first / last / max",
            format!(
                "{:.1} / {:.1} / {:.1} / {:.1} MiB",
                mib(self.rss_idle_kib),
                mib(self.rss_first_kib),
                mib(self.rss_last_kib),
                mib(self.rss_max_kib)
            ),
        );
        row(
            "relay RSS growth first → last",
            format!(
                "{:+.1} MiB ({:+.1} %)",
                mib(self.rss_last_kib) - mib(self.rss_first_kib),
                if self.rss_first_kib > 0 {
                    (self.rss_last_kib as f64 / self.rss_first_kib as f64 - 1.0) * 100.0
                } else {
                    0.0
                }
            ),
        );
        row(
            "relay RSS slope, second half",
            format!("{:+.1} KiB/min", self.rss_slope_second_half_kib_per_min),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line_and_of_noise_around_a_plateau() {
        let line: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 * i as f64 + 7.0)).collect();
        assert!((slope(&line) - 3.0).abs() < 1e-9);
        let flat = [(0.0, 5.0), (1.0, 6.0), (2.0, 5.0), (3.0, 6.0)];
        assert!(slope(&flat).abs() < 0.5);
        assert_eq!(slope(&[(1.0, 1.0)]), 0.0);
    }

    #[test]
    fn lifetimes_average_their_mean() {
        let n = 20_000;
        let mean = (0..n).map(|_| lifetime(10.0).as_secs_f64()).sum::<f64>() / n as f64;
        assert!((9.0..11.0).contains(&mean), "mean lifetime {mean}");
        assert!(lifetime(f64::INFINITY) > Duration::from_secs(3600));
    }
}

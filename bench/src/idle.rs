//! Idle authenticated connections: how much relay memory one costs.
//!
//! Method: register K users first (at most 64 connections at a time, each closed after its
//! `AuthOk`), let the relay settle, read its RSS, then open K connections that authenticate
//! with `Resume` (the token from registration) and hold them without sending anything.
//! Reading RSS again gives (after − before) / K per connection. Registering first keeps the
//! identity store's caches and the registration connections' transient memory out of the
//! figure, and `Resume` does not touch the store, so what is left is the session: socket
//! buffers the kernel does not count in RSS aside, the WebSocket state, the session's reader
//! and writer tasks, its outbound queue and its routing and broker entries.
//!
//! One loopback source address has about 28 000 ephemeral ports (32768–60999), and both the
//! registrations and the held connections use ports, so beyond about 12 000 connections the
//! tool spreads its sockets over `127.0.0.1`, `127.0.0.2`, … (bound before connecting; every
//! 127/8 address is loopback on Linux).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use syncra_core::wire::Frame;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::procstat;
use crate::report::IdleReport;
use crate::syncra;
use crate::ws::Ws;

/// Ports one source address may use, leaving room for other programs.
const PORTS_PER_SOURCE: usize = 24_000;
/// Registrations at a time.
const REGISTER_CONCURRENCY: usize = 64;
/// How long the relay gets to settle before and after the connections are opened.
const SETTLE: Duration = Duration::from_secs(2);
/// Held sessions ping this often so the relay's idle timeout (120 s by default) never fires.
const KEEPALIVE: Duration = Duration::from_secs(50);

/// What to run.
#[derive(Clone, Debug)]
pub struct IdleConfig {
    /// Relay URLs (connections are spread round-robin).
    pub urls: Vec<String>,
    /// Connections to open.
    pub connections: usize,
    /// Relay pids to sample.
    pub pids: Vec<u32>,
    /// How long to hold the connections after measuring.
    pub hold: Duration,
    /// Source addresses to use (default: as many as the ports need).
    pub source_addresses: Option<usize>,
    /// Connection handshakes at a time (the relay drops handshakes beyond 1024 in progress).
    pub concurrency: usize,
}

/// Runs the idle scenario.
pub async fn run(config: IdleConfig) -> anyhow::Result<IdleReport> {
    let k = config.connections;
    if k == 0 {
        bail!("--connections must be at least 1");
    }
    if config.urls.is_empty() {
        bail!("give at least one --url");
    }
    procstat::check_pids(&config.pids)?;
    let limit = procstat::raise_nofile();
    let need = k as u64 + 256;
    if limit < need {
        bail!(
            "this process may open only {limit} files (RLIMIT_NOFILE hard limit) but {k} \
             connections need about {need}; raise the hard limit (limits.conf, systemd \
             LimitNOFILE, or `prlimit`) or ask for fewer connections"
        );
    }
    let sources = config
        .source_addresses
        .unwrap_or_else(|| (2 * k).div_ceil(PORTS_PER_SOURCE))
        .clamp(1, 250);
    let source_ips: Vec<IpAddr> = (0..sources)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + i as u8)))
        .collect();
    let source_of = |i: usize| (sources > 1).then(|| source_ips[i % sources]);
    let url_of = |i: usize| config.urls[i % config.urls.len()].clone();

    let rss_start = procstat::memory_all(&config.pids).rss_kib;

    eprintln!("syncra-load: registering {k} users");
    let started = Instant::now();
    let users = syncra::register_many("ldi", k, REGISTER_CONCURRENCY, &url_of, &source_of).await?;
    let register_s = started.elapsed().as_secs_f64();

    tokio::time::sleep(SETTLE).await;
    let rss_before = procstat::memory_all(&config.pids).rss_kib;
    let cpu_before = procstat::cpu_seconds_all(&config.pids)?;

    eprintln!(
        "syncra-load: opening {k} idle sessions from {} source address(es)",
        sources
    );
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let mut set = JoinSet::new();
    for (i, (user, token)) in users.into_iter().enumerate() {
        let user = user.id();
        let gate = gate.clone();
        let url = url_of(i);
        // Shift by one so a connection does not reuse its registration's source address.
        let source = source_of(i + 1);
        set.spawn(async move {
            let _permit = gate.acquire_owned().await?;
            syncra::resume(user, &token, &url, source).await
        });
    }
    let mut held: Vec<Ws> = Vec::with_capacity(k);
    let mut failed = 0;
    let mut first_error = None;
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(ws)) => held.push(ws),
            Ok(Err(e)) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("task: {e}"));
            }
        }
    }
    let connect_s = started.elapsed().as_secs_f64();
    let cpu_after = procstat::cpu_seconds_all(&config.pids)?;
    tokio::time::sleep(SETTLE).await;
    let after = procstat::memory_all(&config.pids);
    let (rss_after, hwm) = (after.rss_kib, after.hwm_kib);

    let report = IdleReport {
        urls: config.urls.clone(),
        connections: k,
        held: held.len(),
        failed,
        first_error,
        source_addresses: if sources > 1 {
            source_ips.iter().map(ToString::to_string).collect()
        } else {
            vec!["127.0.0.1 (kernel's choice)".into()]
        },
        register_s,
        connect_s,
        pids: config.pids.clone(),
        rss_start_kib: rss_start,
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        hwm_kib: hwm,
        rss_bytes_per_connection: if held.is_empty() {
            0.0
        } else {
            (rss_after as f64 - rss_before as f64) * 1024.0 / held.len() as f64
        },
        connect_cpu_s: cpu_after - cpu_before,
    };

    // Hold, pinging often enough that the relay's idle timeout never closes a session.
    let hold_until = Instant::now() + config.hold;
    while Instant::now() < hold_until {
        let next = (Instant::now() + KEEPALIVE).min(hold_until);
        tokio::time::sleep_until(next.into()).await;
        if Instant::now() < hold_until {
            for ws in &mut held {
                let _ = syncra::send_frame(ws, &Frame::Ping { nonce: 1 }).await;
            }
        }
    }
    drop(held);
    Ok(report)
}

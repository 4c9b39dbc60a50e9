//! Connection floods against a real relay process: slow handshakes (TCP connections that never
//! speak), half-open logins (WebSocket upgraded, never authenticated) and more handshakes than
//! the relay admits at once. Each is cut by its limit, counted in the metrics, logged once per
//! window rather than once per connection, and the relay keeps serving everyone else.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use syncra_core::wire::Outcome;
use syncra_test_relay::{RawClient, TestUser, http_get};
use syncra_test_support::DEADLINE;
use syncra_test_support::process::{RelayProcess, free_port};

/// The value of `syncra_relay_connections_refused_total{reason="…"}`, 0 if absent.
async fn refused(admin: SocketAddr, reason: &str) -> u64 {
    let (status, body) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    let series = format!("syncra_relay_connections_refused_total{{reason=\"{reason}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Waits until `check` holds, polling; panics with `what` at the deadline.
async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Log lines of the refusal warnings for one reason.
fn refusal_lines(log: &str, reason: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("connection refused") && l.contains(&format!("\"{reason}\"")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_floods_are_cut_by_the_limits_and_logged_once() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let relay = RelayProcess::start_with(
        &dir.path().join("relay"),
        &[
            ("SYNCRA_ADMIN_LISTEN", &admin.to_string()),
            ("SYNCRA_LIMITS__HANDSHAKE_TIMEOUT_SECS", "1"),
            ("SYNCRA_LIMITS__PENDING_HANDSHAKES", "16"),
        ],
    );
    let addr: SocketAddr = ([127, 0, 0, 1], relay.port).into();

    // TCP health checks (connect, close): counted, not logged as refusals.
    for _ in 0..5 {
        drop(TcpStream::connect(addr).unwrap());
    }
    wait_for("the health checks are counted", async || {
        refused(admin, "closed_in_handshake").await >= 5
    })
    .await;

    // Slow handshakes: TCP connections that never send their HTTP upgrade. The first 16 hold
    // the pending places until the timeout cuts them; the rest are dropped at accept.
    const SILENT: u64 = 48;
    let silent: Vec<TcpStream> = (0..SILENT)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    wait_for("every silent connection is cut", async || {
        refused(admin, "handshake_timeout").await + refused(admin, "too_many_handshakes").await
            >= SILENT
    })
    .await;
    assert!(refused(admin, "handshake_timeout").await >= 1);
    assert!(
        refused(admin, "too_many_handshakes").await >= 1,
        "{SILENT} silent connections against 16 places must overflow"
    );
    drop(silent);

    // Half-open logins: upgraded to WebSocket, challenge read, then nothing.
    const HALF_OPEN: u64 = 12;
    let mut half_open = Vec::new();
    for _ in 0..HALF_OPEN {
        half_open.push(RawClient::connect(&relay.url()).await);
    }
    wait_for("every half-open login is cut", async || {
        refused(admin, "auth_timeout").await >= HALF_OPEN
    })
    .await;
    drop(half_open);

    // Still serving: two users exchange a message.
    let (a, b) = (TestUser::new("flood_a"), TestUser::new("flood_b"));
    let (mut ca, _) = a.register(&relay.url()).await;
    let (_cb, _) = b.register(&relay.url()).await;
    let out = ca.send_envelope(1, a.seal(&[&b], b"still here")).await;
    assert_eq!(out[0].outcome, Outcome::Delivered);

    // One warning per reason per minute, however many connections it stood for.
    let log = relay.log_text();
    let windows = 1 + started.elapsed().as_secs() as usize / 60;
    for reason in ["handshake_timeout", "too_many_handshakes", "auth_timeout"] {
        let lines = refusal_lines(&log, reason);
        assert!(
            (1..=windows).contains(&lines),
            "{reason}: {lines} log lines for a flood within {windows} window(s); log:\n{log}"
        );
    }
    assert_eq!(
        refusal_lines(&log, "handshake_failed") + refusal_lines(&log, "closed_in_handshake"),
        0,
        "a connect-and-close is not a failed handshake; log:\n{log}"
    );
    assert!(
        !log.contains("ERROR") && !log.contains("panicked"),
        "the relay logged an error during the floods:\n{log}"
    );
}

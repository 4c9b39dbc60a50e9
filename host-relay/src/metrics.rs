//! Prometheus metrics, served on the admin port at `/metrics`.
//!
//! Labels are closed sets (frame kinds, outcomes, error codes), never user ids or addresses, so
//! the series count stays bounded and metrics reveal nothing about who talks to whom.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use tracing::warn;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = [(&'static str, &'static str); 1];

/// Every metric the relay exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Connections accepted (before the handshake).
    pub connections: Counter,
    /// Connections refused before a session started, by reason.
    pub refused: Family<Labels, Counter>,
    /// Authenticated sessions now.
    pub sessions: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Frames received, by kind.
    pub frames_in: Family<Labels, Counter>,
    /// Per-recipient send outcomes.
    pub outcomes: Family<Labels, Counter>,
    /// Errors sent to clients, by code.
    pub errors: Family<Labels, Counter>,
    /// Frames dropped because a session queue was full.
    pub queue_overflow: Counter,
    /// Frames written to sessions.
    pub frames_out: Counter<u64, AtomicU64>,
    /// Write batches (frames_out / batches = average batch size).
    pub write_batches: Counter<u64, AtomicU64>,
    /// Deliveries received from other nodes (one per recipient session's node, each in a batch).
    pub broker_in: Counter,
    /// Batches of deliveries received from other nodes (broker_in / broker_batches_in = average
    /// cluster batch size).
    pub broker_batches_in: Counter,
    /// Broker payloads dropped as not authentic or not a well-formed delivery, by reason.
    pub broker_dropped: Family<Labels, Counter>,
    /// The hot series of the families above, resolved once so the message path does not look
    /// labels up: `frames_in{kind="send"}` and the three `send_outcomes`.
    pub hot: HotCounters,
    /// Refused connections, logged once per window per reason.
    refusal_log: RefusalLog,
    /// Dropped broker payloads, logged once per window per reason.
    broker_drop_log: RefusalLog,
    /// Mailbox failures, logged once per window.
    mailbox_log: RefusalLog,
    /// Mailbox calls that failed (the sender got `mailbox_unavailable`).
    pub mailbox_failures: Counter,
    /// Mailbox entries sent to sessions (backlogs at login and later checks).
    pub mailbox_out: Counter,
    /// Mailbox entries skipped because this relay did not store them (`crate::sealed_mailbox`).
    pub mailbox_foreign: Counter,
}

/// Series of labelled families that every message touches (clones share the family's values).
#[derive(Debug, Clone)]
pub struct HotCounters {
    /// `frames_in{kind="send"}`.
    pub sends_in: Counter,
    /// `send_outcomes{outcome="delivered"}`.
    pub delivered: Counter,
    /// `send_outcomes{outcome="offline"}`.
    pub offline: Counter,
    /// `send_outcomes{outcome="rejected"}`.
    pub rejected: Counter,
    /// `send_outcomes{outcome="stored"}`.
    pub stored: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("syncra_relay");
        let frames_in: Family<Labels, Counter> = Family::default();
        let outcomes: Family<Labels, Counter> = Family::default();
        // One statement each: `get_or_create` returns a guard on the family's lock, and a
        // second call on the same family while that guard lives would deadlock.
        let sends_in = frames_in.get_or_create(&[("kind", "send")]).clone();
        let delivered = outcomes.get_or_create(&[("outcome", "delivered")]).clone();
        let offline = outcomes.get_or_create(&[("outcome", "offline")]).clone();
        let rejected = outcomes.get_or_create(&[("outcome", "rejected")]).clone();
        let stored = outcomes.get_or_create(&[("outcome", "stored")]).clone();
        let hot = HotCounters {
            sends_in,
            delivered,
            offline,
            rejected,
            stored,
        };
        let m = Metrics {
            hot,
            refusal_log: RefusalLog::default(),
            broker_drop_log: RefusalLog::default(),
            mailbox_log: RefusalLog::default(),
            mailbox_failures: Counter::default(),
            mailbox_out: Counter::default(),
            mailbox_foreign: Counter::default(),
            broker_dropped: Family::default(),
            connections: Counter::default(),
            refused: Family::default(),
            sessions: Gauge::default(),
            frames_in,
            outcomes,
            errors: Family::default(),
            queue_overflow: Counter::default(),
            frames_out: Counter::default(),
            write_batches: Counter::default(),
            broker_in: Counter::default(),
            broker_batches_in: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("connections", "Connections accepted", m.connections.clone());
        registry.register(
            "connections_refused",
            "Connections refused before a session started, by reason",
            m.refused.clone(),
        );
        registry.register("sessions", "Authenticated sessions", m.sessions.clone());
        registry.register("frames_in", "Frames received, by kind", m.frames_in.clone());
        registry.register(
            "send_outcomes",
            "Per-recipient send outcomes",
            m.outcomes.clone(),
        );
        registry.register(
            "errors",
            "Errors sent to clients, by code",
            m.errors.clone(),
        );
        registry.register(
            "queue_overflow",
            "Frames refused because a session queue was full",
            m.queue_overflow.clone(),
        );
        registry.register(
            "frames_out",
            "Frames written to sessions",
            m.frames_out.clone(),
        );
        registry.register(
            "write_batches",
            "Write batches flushed to sessions",
            m.write_batches.clone(),
        );
        registry.register(
            "broker_in",
            "Deliveries received from other nodes through the broker",
            m.broker_in.clone(),
        );
        registry.register(
            "broker_batches_in",
            "Batches of deliveries received from other nodes (broker_in / this = average batch size)",
            m.broker_batches_in.clone(),
        );
        registry.register(
            "broker_dropped",
            "Payloads from the broker dropped as not authentic or not a well-formed delivery, by reason",
            m.broker_dropped.clone(),
        );
        registry.register(
            "mailbox_failures",
            "Mailbox calls that failed (senders were told mailbox_unavailable)",
            m.mailbox_failures.clone(),
        );
        registry.register(
            "mailbox_out",
            "Mailbox entries sent to sessions",
            m.mailbox_out.clone(),
        );
        registry.register(
            "mailbox_foreign",
            "Mailbox entries skipped because no relay of this cluster stored them (their MAC is missing or wrong)",
            m.mailbox_foreign.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Counts a connection refused before its session started and logs it once per window
    /// per reason rather than once per connection ([`RefusalLog`]).
    pub fn refuse(&self, reason: &'static str) {
        self.count_refusal(reason);
        self.refusal_log.note(reason);
    }

    /// Counts a payload from the broker that was dropped (see `router::RouterSink`) and logs
    /// it once per window per reason. Anyone who can publish on the broker can send these, so
    /// the log line names the reason only, never the payload.
    pub fn broker_drop(&self, reason: &'static str) {
        self.broker_dropped
            .get_or_create(&[("reason", reason)])
            .inc();
        if let Some(earlier) = self.broker_drop_log.due(reason) {
            warn!(
                reason,
                "dropped a payload from the broker ({reason}): the broker is a trust boundary and \
                 only authenticated deliveries from other relay nodes are forwarded; {earlier} more \
                 were dropped for this reason in the previous {}s window. Further ones in the next \
                 {}s are only counted (syncra_relay_broker_dropped_total{{reason=\"{reason}\"}})",
                REFUSAL_LOG_WINDOW.as_secs(),
                REFUSAL_LOG_WINDOW.as_secs()
            );
        }
    }

    /// Counts a failed mailbox call and logs it once per window (a dead database must not
    /// become a log line per message).
    pub fn mailbox_failure(&self, e: &syncra_core::mailbox::MailboxError) {
        self.mailbox_failures.inc();
        if let Some(earlier) = self.mailbox_log.due("mailbox") {
            warn!(
                "the mailbox failed: {e}; senders are told mailbox_unavailable and their \
                 outboxes retry; {earlier} more failures in the previous {}s window \
                 (syncra_relay_mailbox_failures_total)",
                REFUSAL_LOG_WINDOW.as_secs()
            );
        }
    }

    /// Counts `n` mailbox entries skipped as foreign and logs it once per window.
    pub fn mailbox_foreign(&self, n: u64) {
        self.mailbox_foreign.inc_by(n);
        if let Some(earlier) = self.mailbox_log.due("foreign") {
            warn!(
                "skipped {n} mailbox entries that no relay of this cluster stored (their MAC is \
                 missing or wrong: written to the mailbox's backend by someone else); {earlier} \
                 more in the previous {}s window (syncra_relay_mailbox_foreign_total)",
                REFUSAL_LOG_WINDOW.as_secs()
            );
        }
    }

    /// Counts a refused connection without logging it (a TCP connect-and-close).
    pub fn count_refusal(&self, reason: &'static str) {
        self.refused.get_or_create(&[("reason", reason)]).inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// How often refusals of one reason may reach the log.
pub const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(60);

/// Logs refused connections (slow handshakes, half-open connections that never log in, too
/// many handshakes or connections from one address) once per [`REFUSAL_LOG_WINDOW`] per reason:
/// a flood must not become a flood of log lines, which would cost more than the connections and
/// bury everything else. The first refusal of a window is logged with how many the previous
/// window counted; every refusal is counted in `syncra_relay_connections_refused`.
#[derive(Debug, Default)]
pub struct RefusalLog {
    windows: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl RefusalLog {
    /// Notes one occurrence of `reason`. Returns, for the first of a window only, how many
    /// the previous window counted: the caller logs then, and only then.
    pub fn due(&self, reason: &'static str) -> Option<u64> {
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        match windows.get_mut(reason) {
            Some((start, count)) if now.duration_since(*start) < REFUSAL_LOG_WINDOW => {
                *count += 1;
                None
            }
            Some((start, count)) => {
                let earlier = *count;
                (*start, *count) = (now, 0);
                Some(earlier)
            }
            None => {
                windows.insert(reason, (now, 0));
                Some(0)
            }
        }
    }

    /// Notes one refused connection.
    pub fn note(&self, reason: &'static str) {
        let Some(earlier) = self.due(reason) else {
            return;
        };
        let what = match reason {
            "handshake_timeout" => "a connection did not finish its handshake in time",
            "auth_timeout" => "a connection did not log in in time",
            "too_many_handshakes" => "too many handshakes in progress; a connection was dropped",
            "too_many_connections" => "too many connections from one address",
            "handshake_failed" => "a connection failed its TLS or WebSocket handshake",
            _ => "a connection was refused",
        };
        warn!(
            reason,
            "connection refused: {what}; {earlier} more were refused for this reason in the \
             previous {}s window. Further ones in the next {}s are only counted \
             (syncra_relay_connections_refused_total{{reason=\"{reason}\"}})",
            REFUSAL_LOG_WINDOW.as_secs(),
            REFUSAL_LOG_WINDOW.as_secs()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_reason_is_logged_once_per_window() {
        let log = RefusalLog::default();
        for _ in 0..1000 {
            log.note("handshake_timeout");
        }
        log.note("auth_timeout");
        let windows = log.windows.lock().unwrap();
        assert_eq!(windows["handshake_timeout"].1, 999, "999 counted, 1 logged");
        assert_eq!(windows["auth_timeout"].1, 0);
    }
}

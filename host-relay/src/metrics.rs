//! Prometheus metrics, served on the admin port at `/metrics`.
//!
//! Labels are closed sets (frame kinds, outcomes, error codes), never user ids or addresses, so
//! the series count stays bounded and metrics reveal nothing about who talks to whom.

use std::sync::atomic::AtomicU64;

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
    /// Broker payloads received from other nodes.
    pub broker_in: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("syncra_relay");
        let m = Metrics {
            connections: Counter::default(),
            refused: Family::default(),
            sessions: Gauge::default(),
            frames_in: Family::default(),
            outcomes: Family::default(),
            errors: Family::default(),
            queue_overflow: Counter::default(),
            frames_out: Counter::default(),
            write_batches: Counter::default(),
            broker_in: Counter::default(),
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
            "Payloads received from the broker",
            m.broker_in.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

//! Results of a run: the latency histogram, the counts, the server's CPU and memory; printed
//! as a table and written as JSON.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latencies are recorded in nanoseconds, up to a minute, with three significant digits.
pub fn new_histogram() -> Histogram<u64> {
    // Bounds are constants that hdrhistogram accepts.
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).unwrap_or_else(|_| {
        Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant digits are valid"))
    })
}

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Latency {
    /// Samples recorded (deliveries sent after the warm-up).
    pub count: u64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
}

impl Latency {
    /// Percentiles of a histogram of nanoseconds.
    pub fn from_histogram(h: &Histogram<u64>) -> Latency {
        let us = |ns: u64| ns as f64 / 1000.0;
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.50)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// CPU and memory of processes over the measured window.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProcessStats {
    /// The process ids sampled.
    pub pids: Vec<u32>,
    /// CPU seconds (user + system) spent during the measured window.
    pub cpu_s: f64,
    /// CPU microseconds per delivered message.
    pub cpu_us_per_delivered: f64,
    /// CPU use during the window as a share of one core (1.0 = one core busy).
    pub cores_busy: f64,
    /// Resident memory at the end, KiB (summed over the pids).
    pub rss_kib: u64,
    /// Peak resident memory, KiB (summed over the pids).
    pub hwm_kib: u64,
}

/// Counts over the whole run (warm-up, measured window and drain).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Totals {
    /// Messages sent (one `Send` or one `PUB`, whatever the number of recipients).
    pub sent: u64,
    /// Deliveries expected: sent × recipients.
    pub expected_deliveries: u64,
    /// Outcomes `delivered` reported by the relay (Syncra only).
    pub outcome_delivered: u64,
    /// Outcomes `offline` (Syncra only).
    pub outcome_offline: u64,
    /// Rejected outcomes by error code name (Syncra only).
    pub outcome_rejected: BTreeMap<String, u64>,
    /// `Error` frames answering a send, by code name (Syncra only).
    pub send_errors: BTreeMap<String, u64>,
    /// Overflow notices pushed to receivers (Syncra only).
    pub overflow_notices: u64,
    /// Deliveries received.
    pub received: u64,
    /// Deliveries never received although reported delivered (Syncra), or never received at
    /// all (NATS, which reports no outcome), by the end of the drain.
    pub lost: u64,
    /// Envelopes that failed to open (e2e mode only; should be 0).
    pub open_failures: u64,
    /// Scheduled sends skipped because the pair already had its in-flight cap out (rate mode).
    pub skipped_by_generator: u64,
}

/// One load run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoadReport {
    /// `syncra` or `nats`.
    pub system: String,
    /// `relay-only`, `e2e` or `pubsub`.
    pub mode: String,
    /// Server URLs.
    pub urls: Vec<String>,
    /// Sender/receiver pairs.
    pub pairs: usize,
    /// Recipients per message.
    pub recipients: usize,
    /// Body size, bytes.
    pub size: usize,
    /// Bytes of one message on the wire, before WebSocket framing (the envelope, or the NATS
    /// payload, which is made the same size).
    pub wire_bytes: usize,
    /// How sends were paced.
    pub pacing: String,
    /// Warm-up excluded from the measurement, seconds.
    pub warmup_s: f64,
    /// Measured window, seconds.
    pub measured_s: f64,
    /// Messages sent per second in the measured window.
    pub sent_per_s: f64,
    /// Deliveries received per second in the measured window.
    pub delivered_per_s: f64,
    /// Latency, send to receive, of deliveries sent in the measured window.
    pub latency: Latency,
    /// Rate mode: how late sends left against their schedule (the generator's own timing).
    #[serde(default)]
    pub schedule_lag: Option<Latency>,
    /// Counts over the whole run.
    pub totals: Totals,
    /// The server processes (`--pid`).
    pub server: Option<ProcessStats>,
    /// The load generator itself.
    pub generator: ProcessStats,
    /// All processors' busy time during the window, in cores (from `/proc/stat`).
    #[serde(default)]
    pub machine_cores_busy: f64,
    /// Of that, what neither the server nor the generator used: other programs, and kernel
    /// work (softirq) not charged to either. Large values mean a noisy run.
    #[serde(default)]
    pub other_cores_busy: f64,
    /// Clock ticks per second used to read `/proc`.
    pub clock_ticks: u64,
}

/// An idle-connection run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IdleReport {
    /// Relay URLs.
    pub urls: Vec<String>,
    /// Connections asked for.
    pub connections: usize,
    /// Connections authenticated and held.
    pub held: usize,
    /// Connections that failed, with the first error.
    pub failed: usize,
    /// The first failure's message.
    pub first_error: Option<String>,
    /// Source addresses used.
    pub source_addresses: Vec<String>,
    /// Seconds to register every user.
    pub register_s: f64,
    /// Seconds to open and authenticate every connection.
    pub connect_s: f64,
    /// Relay pids sampled.
    pub pids: Vec<u32>,
    /// Relay RSS when the tool started, KiB.
    pub rss_start_kib: u64,
    /// Relay RSS after registration, before the idle connections, KiB.
    pub rss_before_kib: u64,
    /// Relay RSS with every connection held, KiB.
    pub rss_after_kib: u64,
    /// Relay peak RSS, KiB.
    pub hwm_kib: u64,
    /// (after − before) / held, bytes.
    pub rss_bytes_per_connection: f64,
    /// Relay CPU seconds spent opening and authenticating the connections.
    pub connect_cpu_s: f64,
}

fn fmt_us(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1} ms", v / 1000.0)
    } else {
        format!("{v:.0} µs")
    }
}

impl LoadReport {
    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mut row = |k: &str, v: String| out.push_str(&format!("  {k:<32} {v}\n"));
        row(
            "system / mode",
            format!("{} / {} ({})", self.system, self.mode, self.urls.join(" ")),
        );
        row(
            "load",
            format!(
                "{} pairs, {} recipient(s), body {} B, {} B on the wire, {}",
                self.pairs, self.recipients, self.size, self.wire_bytes, self.pacing
            ),
        );
        row(
            "window",
            format!(
                "{:.1} s measured after {:.1} s warm-up",
                self.measured_s, self.warmup_s
            ),
        );
        row("sent msg/s", format!("{:.0}", self.sent_per_s));
        row("delivered msg/s", format!("{:.0}", self.delivered_per_s));
        let l = &self.latency;
        row(
            "latency p50 / p99 / p99.9 / max",
            format!(
                "{} / {} / {} / {}  (n = {})",
                fmt_us(l.p50_us),
                fmt_us(l.p99_us),
                fmt_us(l.p999_us),
                fmt_us(l.max_us),
                l.count
            ),
        );
        if let Some(l) = &self.schedule_lag {
            row(
                "schedule lag p50 / p99 / max",
                format!(
                    "{} / {} / {}  (generator timing, not latency)",
                    fmt_us(l.p50_us),
                    fmt_us(l.p99_us),
                    fmt_us(l.max_us)
                ),
            );
        }
        let t = &self.totals;
        row(
            "sent / received (whole run)",
            format!(
                "{} sent, {} deliveries expected, {} received",
                t.sent, t.expected_deliveries, t.received
            ),
        );
        if self.system == "syncra" {
            row(
                "outcomes",
                format!(
                    "{} delivered, {} offline, rejected {:?}, send errors {:?}, overflow notices {}",
                    t.outcome_delivered,
                    t.outcome_offline,
                    t.outcome_rejected,
                    t.send_errors,
                    t.overflow_notices
                ),
            );
        }
        row("lost", format!("{}", t.lost));
        if t.open_failures > 0 {
            row("open failures", format!("{}", t.open_failures));
        }
        if t.skipped_by_generator > 0 {
            row(
                "skipped by generator",
                format!("{} (pair in-flight cap reached)", t.skipped_by_generator),
            );
        }
        if let Some(s) = &self.server {
            row(
                "server CPU per delivered msg",
                format!(
                    "{:.2} µs ({:.2} s CPU, {:.2} cores busy, pids {:?})",
                    s.cpu_us_per_delivered, s.cpu_s, s.cores_busy, s.pids
                ),
            );
            row(
                "server RSS end / peak",
                format!("{} KiB / {} KiB", s.rss_kib, s.hwm_kib),
            );
        }
        let g = &self.generator;
        row(
            "generator CPU per delivered msg",
            format!(
                "{:.2} µs ({:.2} cores busy)",
                g.cpu_us_per_delivered, g.cores_busy
            ),
        );
        row(
            "machine busy / of which others",
            format!(
                "{:.2} / {:.2} cores{}",
                self.machine_cores_busy,
                self.other_cores_busy,
                if self.other_cores_busy > 0.2 {
                    "  (noisy: something else ran during the window)"
                } else {
                    ""
                }
            ),
        );
        out
    }
}

impl IdleReport {
    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mut row = |k: &str, v: String| out.push_str(&format!("  {k:<32} {v}\n"));
        row("relay", self.urls.join(" "));
        row(
            "connections held / asked",
            format!(
                "{} / {} ({} failed)",
                self.held, self.connections, self.failed
            ),
        );
        if let Some(e) = &self.first_error {
            row("first error", e.clone());
        }
        row("source addresses", self.source_addresses.join(" "));
        row(
            "register / connect time",
            format!("{:.1} s / {:.1} s", self.register_s, self.connect_s),
        );
        row(
            "relay RSS start / before / after",
            format!(
                "{} / {} / {} KiB (peak {} KiB)",
                self.rss_start_kib, self.rss_before_kib, self.rss_after_kib, self.hwm_kib
            ),
        );
        row(
            "relay RSS per connection",
            format!(
                "{:.0} B ({:.2} KiB)",
                self.rss_bytes_per_connection,
                self.rss_bytes_per_connection / 1024.0
            ),
        );
        row(
            "relay CPU to connect all",
            format!("{:.2} s", self.connect_cpu_s),
        );
        out
    }
}

/// Writes a report as pretty JSON.
pub fn write_json<T: Serialize>(path: &Path, report: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(report)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

/// Reads a load report written with `--json`.
pub fn read_load(path: &Path) -> anyhow::Result<LoadReport> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Two runs side by side, with the ratio `a / b` of each figure.
pub fn compare(a: &LoadReport, b: &LoadReport) -> String {
    let name = |r: &LoadReport| format!("{} {}", r.system, r.mode);
    let mut out = format!(
        "  {:<34} {:>16} {:>16} {:>9}\n",
        "",
        name(a),
        name(b),
        "ratio"
    );
    let mut row = |k: &str, x: f64, y: f64, unit: &str| {
        let ratio = if y != 0.0 {
            format!("{:.2}×", x / y)
        } else {
            "–".into()
        };
        out.push_str(&format!(
            "  {k:<34} {:>13.1} {unit:<2} {:>13.1} {unit:<2} {ratio:>9}\n",
            x, y
        ));
    };
    row("delivered msg/s", a.delivered_per_s, b.delivered_per_s, "");
    row("latency p50", a.latency.p50_us, b.latency.p50_us, "µs");
    row("latency p99", a.latency.p99_us, b.latency.p99_us, "µs");
    row("latency p99.9", a.latency.p999_us, b.latency.p999_us, "µs");
    let cpu = |r: &LoadReport| r.server.as_ref().map_or(0.0, |s| s.cpu_us_per_delivered);
    let rss = |r: &LoadReport| r.server.as_ref().map_or(0.0, |s| s.rss_kib as f64);
    row("server CPU per delivered msg", cpu(a), cpu(b), "µs");
    row("server RSS at end", rss(a), rss(b), "Ki");
    row(
        "generator CPU per delivered msg",
        a.generator.cpu_us_per_delivered,
        b.generator.cpu_us_per_delivered,
        "µs",
    );
    row("lost", a.totals.lost as f64, b.totals.lost as f64, "");
    row(
        "other programs' CPU (noise)",
        a.other_cores_busy,
        b.other_cores_busy,
        "c",
    );
    out
}

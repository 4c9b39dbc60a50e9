//! `syncra-load`: the Syncra load generator. See `bench/scenarios/` for ready-made runs and
//! `docs/BENCHMARKS.md` ("Relay under load") for the method and the results.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use syncra_bench::idle::{self, IdleConfig};
use syncra_bench::load::{self, LoadConfig, Pacing, System};
use syncra_bench::mailbox::{self, MailboxConfig};
use syncra_bench::report::{self, LoadReport};
use syncra_bench::soak::{self, SoakConfig};

/// Load generator for Syncra relays, with nats-server over WebSocket as the reference peer.
///
/// Load goes only to loopback URLs. Every run is bounded by --duration plus a short drain.
#[derive(Parser, Debug)]
#[command(name = "syncra-load", version)]
struct Cli {
    /// Worker threads of the generator's runtime.
    #[arg(long, global = true, default_value_t = 2)]
    threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Pairs of Syncra users sending sealed envelopes through one or more relays.
    Relay(RelayArgs),
    /// The same load over nats-server's WebSocket listener (plain publish/subscribe).
    Nats(NatsArgs),
    /// Hold many idle authenticated connections and report the relay's memory per connection.
    Idle(IdleArgs),
    /// Many sessions with steady traffic and churn for a long time; the relay's RSS over time.
    Soak(SoakArgs),
    /// The offline mailbox: senders write to recipients who are away (answered `stored`), the
    /// recipients log in and drain their backlogs, then the same traffic live for comparison.
    Mailbox(MailboxArgs),
    /// Print two --json reports side by side with their ratios (first / second).
    Compare {
        /// The first report (the numerator).
        first: PathBuf,
        /// The second report (the denominator).
        second: PathBuf,
    },
    /// Print a free TCP port on 127.0.0.1 (for the scenario scripts).
    FreePort,
    /// Wait until something listens on 127.0.0.1:PORT (for the scenario scripts).
    WaitPort {
        /// The port.
        port: u16,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 20)]
        timeout: u64,
        /// Give up as soon as this process has exited.
        #[arg(long)]
        pid: Option<u32>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Envelopes sealed ahead of time and reused; receivers do not open them.
    RelayOnly,
    /// Every message sealed by its sender and opened by every receiver.
    E2e,
    /// MLS carriages, the format conversations use: a group per sender, created by one commit
    /// before the run; application messages made ahead of time and not opened.
    Mls,
}

#[derive(Args, Debug)]
struct Common {
    /// Sender/receiver pairs.
    #[arg(long, default_value_t = 100)]
    pairs: usize,
    /// Body size in bytes.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Unmeasured warm-up seconds.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Fixed total rate in messages per second (open loop), spread over the senders.
    #[arg(long, conflicts_with = "window")]
    rate: Option<f64>,
    /// Messages in flight per sender (closed loop; the default, 16, when --rate is absent).
    #[arg(long)]
    window: Option<u32>,
    /// Recipients per message: sender i sends to receivers i … i+K-1 (a group of K).
    #[arg(long, default_value_t = 1)]
    recipients: usize,
    /// Server process id(s) whose CPU time and memory to read from /proc.
    #[arg(long = "pid")]
    pids: Vec<u32>,
    /// Seconds to wait for in-flight messages after the senders stop.
    #[arg(long, default_value_t = 3.0)]
    drain: f64,
    /// Write the report as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct RelayArgs {
    /// Relay URL, ws://127.0.0.1:PORT/; repeat for several nodes (each sender and its receiver
    /// are then on different nodes).
    #[arg(long = "url", required = true)]
    urls: Vec<String>,
    /// What the clients do with envelopes.
    #[arg(long, value_enum, default_value_t = Mode::RelayOnly)]
    mode: Mode,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
struct NatsArgs {
    /// nats-server WebSocket URL, ws://127.0.0.1:PORT (its `websocket { port, no_tls: true }`).
    #[arg(long = "url", required = true)]
    urls: Vec<String>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
struct IdleArgs {
    /// Relay URL; repeat to spread connections over several nodes.
    #[arg(long = "url", required = true)]
    urls: Vec<String>,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Relay process id(s) to read memory from.
    #[arg(long = "pid")]
    pids: Vec<u32>,
    /// Seconds to hold the connections after measuring.
    #[arg(long, default_value_t = 3.0)]
    hold: f64,
    /// Loopback source addresses to spread sockets over (default: as many as the ports need).
    #[arg(long)]
    source_addresses: Option<usize>,
    /// Connection handshakes in progress at a time.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Write the report as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct SoakArgs {
    /// Relay URL; repeat to spread sessions over several nodes.
    #[arg(long = "url", required = true)]
    urls: Vec<String>,
    /// Sessions kept open.
    #[arg(long, default_value_t = 5000)]
    connections: usize,
    /// Messages per second in total (each session sends on its own schedule).
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Sessions closed and logged in again per second, on average.
    #[arg(long, default_value_t = 25.0)]
    churn: f64,
    /// Seconds to run once every session is open.
    #[arg(long, default_value_t = 600.0)]
    duration: f64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 10.0)]
    interval: f64,
    /// Body size in bytes.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Relay process id(s) to sample.
    #[arg(long = "pid")]
    pids: Vec<u32>,
    /// Write the report (with every sample) as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct MailboxArgs {
    /// Relay URL, ws://127.0.0.1:PORT/.
    #[arg(long)]
    url: String,
    /// Sending users.
    #[arg(long, default_value_t = 10)]
    senders: usize,
    /// Recipients (away during the store phase); sender i writes to recipient i mod R.
    #[arg(long, default_value_t = 10)]
    recipients: usize,
    /// Messages each sender sends, in the store phase and again live.
    #[arg(long, default_value_t = 1000)]
    messages: usize,
    /// Body size in bytes.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Unanswered sends per sender.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// The relay's process id(s).
    #[arg(long = "pid")]
    pids: Vec<u32>,
    /// The mailbox backend's process id(s); their child processes are counted too.
    #[arg(long = "backend-pid")]
    backend_pids: Vec<u32>,
    /// A label for the report (the backend's name).
    #[arg(long, default_value = "mailbox")]
    label: String,
    /// Write the report as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn secs(v: f64, what: &str) -> anyhow::Result<Duration> {
    if !(0.0..=3600.0).contains(&v) {
        bail!("{what} must be between 0 and 3600 seconds");
    }
    Ok(Duration::from_secs_f64(v))
}

fn load_config(system: System, urls: Vec<String>, c: &Common) -> anyhow::Result<LoadConfig> {
    let pacing = match (c.rate, c.window) {
        (Some(r), _) if r > 0.0 => Pacing::Rate(r),
        (Some(_), _) => bail!("--rate must be positive"),
        (None, w) => Pacing::Window(w.unwrap_or(16).max(1)),
    };
    for url in &urls {
        syncra_bench::ws::target(url)?;
    }
    Ok(LoadConfig {
        system,
        urls,
        pairs: c.pairs,
        recipients: c.recipients,
        size: c.size,
        duration: secs(c.duration, "--duration")?,
        warmup: secs(c.warmup, "--warmup")?,
        pacing,
        pids: c.pids.clone(),
        drain: secs(c.drain, "--drain")?,
    })
}

fn finish_load(report: &LoadReport, json: Option<&PathBuf>) -> anyhow::Result<()> {
    println!("{}", report.table());
    if let Some(path) = json {
        report::write_json(path, report)?;
    }
    if report.totals.received == 0 {
        bail!("nothing was delivered");
    }
    Ok(())
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Relay(args) => {
            let system = match args.mode {
                Mode::RelayOnly => System::SyncraRelayOnly,
                Mode::E2e => System::SyncraE2e,
                Mode::Mls => System::SyncraMls,
            };
            let config = load_config(system, args.urls, &args.common)?;
            let report = runtime(cli.threads)?.block_on(load::run(config))?;
            finish_load(&report, args.common.json.as_ref())
        }
        Command::Nats(args) => {
            let config = load_config(System::Nats, args.urls, &args.common)?;
            let report = runtime(cli.threads)?.block_on(load::run(config))?;
            finish_load(&report, args.common.json.as_ref())
        }
        Command::Idle(args) => {
            for url in &args.urls {
                syncra_bench::ws::target(url)?;
            }
            let config = IdleConfig {
                urls: args.urls,
                connections: args.connections,
                pids: args.pids,
                hold: secs(args.hold, "--hold")?,
                source_addresses: args.source_addresses,
                concurrency: args.concurrency,
            };
            let report = runtime(cli.threads)?.block_on(idle::run(config))?;
            println!("{}", report.table());
            if let Some(path) = &args.json {
                report::write_json(path, &report)?;
            }
            if report.held == 0 {
                bail!("no connection could be opened");
            }
            Ok(())
        }
        Command::Soak(args) => {
            for url in &args.urls {
                syncra_bench::ws::target(url)?;
            }
            let config = SoakConfig {
                urls: args.urls,
                connections: args.connections,
                rate: args.rate,
                churn: args.churn,
                duration: Duration::from_secs_f64(args.duration.clamp(0.0, 7.0 * 24.0 * 3600.0)),
                interval: secs(args.interval, "--interval")?,
                size: args.size,
                pids: args.pids,
            };
            let report = runtime(cli.threads)?.block_on(soak::run(config))?;
            println!("{}", report.table());
            if let Some(path) = &args.json {
                report::write_json(path, &report)?;
            }
            if report.received == 0 {
                bail!("nothing was delivered");
            }
            Ok(())
        }
        Command::Mailbox(args) => {
            syncra_bench::ws::target(&args.url)?;
            let config = MailboxConfig {
                url: args.url,
                senders: args.senders,
                recipients: args.recipients,
                messages: args.messages,
                size: args.size,
                window: args.window,
                relay_pids: args.pids,
                backend_pids: args.backend_pids,
                label: args.label,
            };
            let report = runtime(cli.threads)?.block_on(mailbox::run(config))?;
            print!("{}", report.table());
            if let Some(path) = &args.json {
                report::write_json(path, &report)?;
            }
            if report.store.messages == 0 || report.left_after_drain > 0 {
                bail!("nothing was stored, or the drain left entries behind");
            }
            Ok(())
        }
        Command::Compare { first, second } => {
            let a = report::read_load(&first)?;
            let b = report::read_load(&second)?;
            print!("{}", report::compare(&a, &b));
            Ok(())
        }
        Command::FreePort => {
            let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
            println!("{}", l.local_addr()?.port());
            Ok(())
        }
        Command::WaitPort { port, timeout, pid } => {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let deadline = Instant::now() + Duration::from_secs(timeout);
            while Instant::now() < deadline {
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return Ok(());
                }
                if let Some(pid) = pid
                    && !std::path::Path::new(&format!("/proc/{pid}")).exists()
                {
                    bail!("process {pid} exited before listening on {addr}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            bail!("nothing listens on {addr} after {timeout} s")
        }
    }
}

//! The `syncra` binary: headless commands for scripts over [`syncra_client::Client`].
//!
//! Exit status of `syncra send`: 0 delivered, 2 recipient offline, 3 queued (relay unreachable;
//! the message waits in the outbox), 1 failed or any other error.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::json;
use syncra_client::client::{Serve, ServeEvent};
use syncra_client::contacts::PinOutcome;
use syncra_client::keystore::PassphraseSource;
use syncra_client::{Client, Home, Incoming, InitOptions, SendState, Target};
use tracing_subscriber::EnvFilter;
use zeroize::Zeroizing;

/// Syncra: end-to-end-encrypted messaging from the terminal.
///
/// Files live under $SYNCRA_HOME (default ~/.syncra). The passphrase comes from
/// --passphrase-file, else $SYNCRA_PASSPHRASE, else a prompt.
#[derive(Parser, Debug)]
#[command(name = "syncra", version)]
struct Cli {
    /// Read the passphrase from the first line of this file.
    #[arg(long, global = true)]
    passphrase_file: Option<PathBuf>,
    /// With no command: use the line-mode interface instead of the full-screen one.
    #[arg(long)]
    line: bool,
    /// Allow plaintext ws:// to a relay that is not on this machine (labs only; warns on every
    /// connection). Without it, ws:// is refused unless the host is localhost, 127.0.0.0/8 or ::1.
    #[arg(long, global = true)]
    insecure_plaintext: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new identity (asks for a passphrase twice).
    Init,
    /// Register this identity on a relay under a handle.
    Register {
        /// The relay URL: wss://relay.example/, or ws:// to this machine (ws://127.0.0.1:7443/).
        #[arg(long)]
        relay: String,
        /// The handle to register (3-32 of a-z, 0-9, _; starting with a letter).
        #[arg(long)]
        handle: String,
    },
    /// Manage contacts.
    Contact {
        #[command(subcommand)]
        command: ContactCommand,
    },
    /// Show the safety number with a contact; --mark-verified after comparing it.
    Verify {
        /// The contact's handle.
        handle: String,
        /// Mark it verified (and accept a changed key).
        #[arg(long)]
        mark_verified: bool,
    },
    /// Send a message to a contact (handle) or a group (@name). Text from stdin if omitted.
    Send {
        /// Handle, user id, or @group.
        to: String,
        /// The message; read from stdin if absent.
        text: Vec<String>,
    },
    /// Print incoming messages as JSON Lines until interrupted (reconnects by itself).
    Listen,
    /// Show a conversation's history.
    History {
        /// Handle, user id, or @group.
        with: String,
        /// Only the last N messages.
        #[arg(long)]
        limit: Option<usize>,
        /// JSON Lines instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Export a conversation as plaintext JSON Lines (to stdout).
    Export {
        /// Handle, user id, or @group.
        with: String,
    },
    /// Manage client-side groups.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
    },
    /// Show identity, relay and connection status.
    Status,
    /// Your mailbox at the relay (sealed messages held while you were away).
    Mailbox {
        #[command(subcommand)]
        command: MailboxCommand,
    },
    /// Run a WebAssembly bot with this identity.
    Bot {
        #[command(subcommand)]
        command: BotCommand,
    },
}

#[derive(Subcommand, Debug)]
enum MailboxCommand {
    /// Delete every message the relay holds for you, unread: they are lost for good.
    Clear,
}

#[derive(Subcommand, Debug)]
enum BotCommand {
    /// Run PLUGIN.wasm (world `bot`) with the identity in SYNCRA_HOME until interrupted: every
    /// message to this identity goes to the bot, and its replies are sealed and sent.
    Run {
        /// The component.
        plugin: PathBuf,
        /// Linear memory cap in MiB.
        #[arg(long, default_value_t = 64)]
        memory_mib: u32,
        /// Fuel per call: bounds the CPU work of one call (the wall-clock deadline, `deadline_ms`
        /// in settings.toml, bounds its time, sleeps included).
        #[arg(long, default_value_t = 200_000_000)]
        fuel: u64,
        /// Let the bot read and write this directory (repeatable).
        #[arg(long)]
        grant_dir: Vec<PathBuf>,
        /// Let the bot open network connections.
        #[arg(long)]
        grant_network: bool,
        /// The bot's name, for its log lines and its private store
        /// (`plugins/NAME.kv`, sealed); defaults to the file name without `.wasm`.
        #[arg(long)]
        name: Option<String>,
        /// Show what the guest writes to stderr (its `log` lines are shown anyway).
        #[arg(long)]
        show_stderr: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ContactCommand {
    /// Look up a handle or user id on the relay and pin its key.
    Add {
        /// Handle or user id.
        query: String,
    },
    /// List contacts.
    List,
}

#[derive(Subcommand, Debug)]
enum GroupCommand {
    /// Create a group with contacts (an MLS group; needs the relay).
    Create {
        /// The group's name.
        name: String,
        /// Member handles.
        members: Vec<String>,
    },
    /// Add members.
    Add {
        /// The group's name.
        name: String,
        /// Member handles.
        members: Vec<String>,
    },
    /// Remove members (they cannot read anything sent after the removal).
    Remove {
        /// The group's name.
        name: String,
        /// Member handles.
        members: Vec<String>,
    },
    /// Leave a group (another member commits it; you are out once they do).
    Leave {
        /// The group's name.
        name: String,
    },
    /// List groups: the members shown are the MLS roster every member agrees on.
    List,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `bot run` shows the bot's own log lines (and the host's about it) by default: a bot author
    // should not need RUST_LOG to see what the guest says. Everything else stays quiet.
    let default = match &cli.command {
        Some(Command::Bot {
            command: BotCommand::Run { .. },
        }) => "warn,syncra_plugin_wasm=info,syncra_client::bot=info",
        _ => "warn",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!(
                "error: {}",
                syncra_core::text::escape_untrusted(&format!("{e:#}"))
            );
            ExitCode::FAILURE
        }
    }
}

fn passphrase(
    cli_file: &Option<PathBuf>,
    prompt: &str,
    confirm: bool,
) -> anyhow::Result<Zeroizing<String>> {
    PassphraseSource::choose(cli_file.clone()).read(prompt, confirm)
}

async fn open(cli: &Cli) -> anyhow::Result<Client> {
    let home = Home::from_env()?;
    home.require_identity()?;
    let pass = passphrase(&cli.passphrase_file, "Passphrase: ", false)?;
    let mut client = Client::open(home, &pass)?;
    if cli.insecure_plaintext {
        client.allow_insecure_plaintext();
    }
    Ok(client)
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let Some(command) = &cli.command else {
        return interactive(&cli).await;
    };
    match command {
        Command::Init => {
            let home = Home::from_env()?;
            let pass = passphrase(&cli.passphrase_file, "New passphrase: ", true)?;
            let client = Client::init(home, &pass, InitOptions::default())?;
            println!(
                "created a new identity in {}",
                client.home().root().display()
            );
            println!("user id:     {}", client.user_id());
            println!("fingerprint: {}", client.fingerprint());
            println!(
                "your passphrase protects your identity key and your message history; it \
                 cannot be recovered, so keep it safe"
            );
            println!("next: syncra register --relay ws://127.0.0.1:7443/ --handle YOUR_NAME");
        }
        Command::Register { relay, handle } => {
            let mut client = open(&cli).await?;
            waiting(
                &format!("waiting for the relay at {}", escape(relay)),
                client.register(relay, handle),
            )
            .await?;
            println!("registered as {handle} on {relay}");
            client.disconnect().await;
        }
        Command::Contact { command } => match command {
            ContactCommand::Add { query } => {
                let mut client = open(&cli).await?;
                connect(&mut client).await?;
                let (contact, outcome) = client.add_contact(query).await?;
                match outcome {
                    PinOutcome::Pinned => println!(
                        "added {} ({}); compare safety numbers with `syncra verify {}`",
                        contact.handle, contact.record.user_id, contact.handle
                    ),
                    PinOutcome::Unchanged => {
                        println!("{} is already a contact (key unchanged)", contact.handle)
                    }
                    PinOutcome::KeyChanged(old) => {
                        eprintln!(
                            "WARNING: {} now answers with a DIFFERENT identity key; sending to \
                             {} is blocked until you run `syncra verify {}` and compare safety \
                             numbers",
                            old.handle, old.handle, old.handle
                        );
                        client.disconnect().await;
                        return Ok(ExitCode::FAILURE);
                    }
                }
                client.disconnect().await;
            }
            ContactCommand::List => {
                let client = open(&cli).await?;
                for c in client.book().contacts.values() {
                    let mark = if c.key_changed.is_some() {
                        "KEY CHANGED"
                    } else if c.verified {
                        "verified"
                    } else if c.request {
                        "request"
                    } else {
                        "unverified"
                    };
                    println!("{}\t{}\t{mark}", c.handle, c.record.user_id);
                }
            }
        },
        Command::Verify {
            handle,
            mark_verified,
        } => {
            let mut client = open(&cli).await?;
            let info = client.verify(handle, *mark_verified)?;
            if info.key_changed && !mark_verified {
                println!(
                    "the identity key of {} CHANGED; the new identity is {}",
                    info.handle, info.user_id
                );
            }
            println!("safety number with {}:", info.handle);
            for chunk in info.number.split(' ').collect::<Vec<_>>().chunks(4) {
                println!("  {}", chunk.join(" "));
            }
            if *mark_verified {
                println!("marked {} as verified", info.handle);
            } else {
                println!(
                    "compare it with what {} sees, then run `syncra verify {} --mark-verified`",
                    info.handle, info.handle
                );
            }
        }
        Command::Send { to, text } => {
            let text = if text.is_empty() {
                if std::io::stdin().is_terminal() {
                    eprintln!("type the message, end with Ctrl-D");
                }
                let mut buf = String::new();
                std::io::stdin()
                    .read_to_string(&mut buf)
                    .context("reading the message from stdin")?;
                buf.trim_end_matches('\n').to_owned()
            } else {
                text.join(" ")
            };
            let mut client = open(&cli).await?;
            let report = waiting(
                "sending (waiting for the relay)",
                client.send_text(to, &text),
            )
            .await?;
            // Anything else waiting leaves too while we are connected.
            if client.is_connected() {
                let _ = client.drain_outbox().await;
            }
            client.disconnect().await;
            let code = match &report.state {
                SendState::Delivered => {
                    println!("delivered");
                    0
                }
                SendState::Offline => {
                    println!("offline: the recipient is not connected; the relay keeps nothing");
                    2
                }
                SendState::Stored => {
                    println!(
                        "stored: the recipient is not connected; the relay holds the sealed \
                         message until they log in"
                    );
                    4
                }
                SendState::Queued(why) => {
                    println!(
                        "queued: {}; it will be sent on the next connection",
                        escape(why)
                    );
                    3
                }
                SendState::Failed(why) => {
                    println!("failed: {}", escape(why));
                    1
                }
            };
            let summary = syncra_client::client::outcome_summary(&report.outcomes);
            if !summary.is_empty() {
                println!("{summary}");
            }
            return Ok(ExitCode::from(code));
        }
        Command::Listen => {
            let mut client = open(&cli).await?;
            listen(&mut client).await?;
        }
        Command::History { with, limit, json } => {
            let client = open(&cli).await?;
            for m in client.history_of(with, *limit)? {
                let who = client.name_of(&m.sender);
                if *json {
                    print_json(&message_json(&client, &m));
                } else {
                    let mark = match (m.delivery, &m.reach) {
                        (Some(d), reach) => format!(
                            " [{}{}]",
                            serde_json::to_value(d)?.as_str().unwrap_or(""),
                            reach.as_ref().map(|r| format!(": {r}")).unwrap_or_default()
                        ),
                        (None, _) => String::new(),
                    };
                    let (who, text) = (escape(&who), escape(&m.text));
                    if m.event {
                        println!("{} * {text}", format_time(m.timestamp_ms));
                    } else {
                        println!("{} {who}: {text}{mark}", format_time(m.timestamp_ms));
                    }
                }
            }
        }
        Command::Export { with } => {
            let client = open(&cli).await?;
            for m in client.history_of(with, None)? {
                print_json(&message_json(&client, &m));
            }
        }
        Command::Group { command } => {
            let mut client = open(&cli).await?;
            if !matches!(command, GroupCommand::List) {
                waiting("connecting to the relay", client.connect()).await?;
            }
            match command {
                GroupCommand::Create { name, members } => {
                    let g = client.group_create(name, members).await?;
                    println!("created @{} with {} members", g.name, g.members.len());
                }
                GroupCommand::Add { name, members } => {
                    let g = client.group_update(name, members, &[]).await?;
                    println!("@{} now has {} members", g.name, g.members.len());
                }
                GroupCommand::Remove { name, members } => {
                    let g = client.group_update(name, &[], members).await?;
                    println!(
                        "@{} now has {} members; removed members cannot read what follows",
                        g.name,
                        g.members.len()
                    );
                }
                GroupCommand::Leave { name } => {
                    let g = client.group_leave(name).await?;
                    println!(
                        "asked to leave @{}; you are out once another member commits it",
                        g.name
                    );
                }
                GroupCommand::List => {
                    for g in client.book().groups.values() {
                        let mut names: Vec<String> =
                            g.members.iter().map(|m| client.name_of(m)).collect();
                        if !g.members.contains(&client.user_id()) {
                            names = vec!["(you are no longer a member)".to_owned()];
                        }
                        let creator = g
                            .creator
                            .map(|c| client.name_of(&c))
                            .unwrap_or_else(|| "?".into());
                        println!(
                            "@{}\t{}\tcreated by {}",
                            g.name,
                            escape(&names.join(", ")),
                            escape(&creator)
                        );
                    }
                }
            }
            client.disconnect().await;
        }
        Command::Bot {
            command:
                BotCommand::Run {
                    plugin,
                    memory_mib,
                    fuel,
                    grant_dir,
                    grant_network,
                    name,
                    show_stderr,
                },
        } => {
            let mut client = open(&cli).await?;
            let mut config = syncra_plugin_wasm::WasmPluginConfig::new(plugin);
            config.memory_mib = *memory_mib;
            config.fuel_per_call = *fuel;
            config.grants.dirs = grant_dir.clone();
            config.grants.network = *grant_network;
            config.grants.stderr = *show_stderr;
            if let Some(name) = name {
                syncra_client::bot::check_name(name)?;
                config.name = Some(name.clone());
            }
            let store_dir = client.home().root().join("plugins");
            syncra_core::crypto::keyfile::create_private_dir(&store_dir)?;
            let store_key = client.plugin_store_key();
            // Compiling a large component (a Python bot is ~18 MB) takes seconds the first time.
            let bot = waiting(
                "loading the bot (compiling it; a large one, such as a Python bot, takes a while)",
                async move {
                    tokio::task::spawn_blocking(move || {
                        syncra_client::bot::load(config, &store_dir, store_key)
                    })
                    .await
                    .context("the bot loader stopped")?
                },
            )
            .await?;
            let commands = syncra_client::bot::call(&bot, |p| p.commands()).await?;
            eprintln!(
                "running bot {} as {} ({}); commands: {}",
                bot.name(),
                client
                    .settings()
                    .handle
                    .as_deref()
                    .unwrap_or("(unregistered)"),
                client.user_id(),
                syncra_client::bot::command_list(&commands)
            );
            let stop = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            syncra_client::bot::run(&mut client, bot, stop).await?;
        }
        Command::Mailbox {
            command: MailboxCommand::Clear,
        } => {
            let mut client = open(&cli).await?;
            connect(&mut client).await?;
            let session = client
                .session()
                .context("not connected to the relay; check `syncra status`")?;
            session
                .clear_mailbox()
                .await
                .map_err(|e| anyhow::anyhow!("emptying the mailbox: {e}"))?;
            client.disconnect().await;
            println!("your mailbox at the relay is empty");
        }
        Command::Status => {
            let mut client = open(&cli).await?;
            let s = client.settings().clone();
            println!("home:        {}", client.home().root().display());
            println!("user id:     {}", client.user_id());
            println!("fingerprint: {}", client.fingerprint());
            println!(
                "handle:      {}",
                s.handle.as_deref().unwrap_or("(not registered)")
            );
            println!("relay:       {}", s.relay.as_deref().unwrap_or("(none)"));
            println!("contacts:    {}", client.book().contacts.len());
            println!("groups:      {}", client.book().groups.len());
            println!(
                "mls:         {} conversations (1:1 and groups)",
                client.conversation_count()
            );
            for aside in client.conversations_set_aside() {
                let what = match aside.id {
                    Some(id) => format!("conversation {id}"),
                    None => "a state file, started anew".to_owned(),
                };
                println!(
                    "set aside:   {what} (damaged: {}), kept as {}",
                    escape(&aside.why),
                    aside.path.display()
                );
            }
            println!(
                "outbox:      {} waiting, {} set aside in {}",
                client.outbox_len(),
                client.outbox_failed_len(),
                client.home().outbox_dir().join("failed").display()
            );
            if s.relay.is_some() {
                match client.connect().await {
                    Ok(()) => println!("connection:  ok"),
                    Err(e) => println!("connection:  {}", escape(&e.to_string())),
                }
                client.disconnect().await;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `syncra` with no command: the full-screen UI (or line mode), onboarding included.
async fn interactive(cli: &Cli) -> anyhow::Result<ExitCode> {
    let home = Home::from_env()?;
    home.ensure()?;
    let settings = home.settings()?;
    let frontend: Box<dyn syncra_core::ui::UiFrontend> =
        if cli.line || settings.frontend == syncra_ui_line::KIND {
            Box::new(syncra_ui_line::LineFrontend)
        } else if settings.frontend == syncra_ui_ratatui::KIND {
            if !std::io::stdout().is_terminal() {
                bail!("the full-screen interface needs a terminal; use `syncra --line` in pipes");
            }
            Box::new(
                syncra_ui_ratatui::RatatuiFrontend::new(&settings.ui, settings.bell)
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
            )
        } else {
            bail!(
                "unknown frontend {:?} in {}; use \"ratatui\" or \"line\"",
                settings.frontend,
                home.settings_file().display()
            );
        };
    syncra_client::app::run(
        home,
        frontend,
        syncra_client::app::Options {
            insecure_plaintext: cli.insecure_plaintext,
        },
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

async fn connect(client: &mut Client) -> anyhow::Result<()> {
    let relay = client.settings().relay.clone().unwrap_or_default();
    waiting(
        &format!("waiting for the relay at {}", escape(&relay)),
        client.connect(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("connecting to the relay: {e}"))
}

/// How long a command waits on the network before it says that it is waiting.
const WAITING_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs `work`; if it takes longer than [`WAITING_AFTER`], says `what…` on stderr once, so a
/// command waiting on a slow or unreachable relay never looks hung.
async fn waiting<T>(what: &str, work: impl Future<Output = T>) -> T {
    tokio::pin!(work);
    tokio::select! {
        done = &mut work => done,
        () = tokio::time::sleep(WAITING_AFTER) => {
            eprintln!("{what}…");
            work.await
        }
    }
}

fn message_json(client: &Client, m: &syncra_client::history::StoredMessage) -> serde_json::Value {
    json!({
        "id": m.id,
        "from": m.sender.to_string(),
        "from_handle": client.name_of(&m.sender),
        "outgoing": m.outgoing,
        "timestamp_ms": m.timestamp_ms,
        "text": m.text,
        "delivery": m.delivery,
        "reach": m.reach,
        "event": m.event,
    })
}

/// Peer-controlled text for a terminal: control and bidi characters shown, never executed.
fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    syncra_core::text::escape_untrusted(text)
}

/// One JSON line on stdout: exact JSON, and inert on a terminal.
fn print_json(value: &serde_json::Value) {
    println!("{}", syncra_core::text::json_inert(&value.to_string()));
}

fn format_time(ms: u64) -> String {
    syncra_core::time::Civil::from_ms(ms).full()
}

/// Prints incoming messages as JSON Lines; reconnects with backoff; drains the outbox on every
/// (re)connection and every few seconds, so messages written by other processes leave too.
async fn listen(client: &mut Client) -> anyhow::Result<()> {
    use std::io::Write;
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let mut serve = Serve::new(client, stop)?;
    while let Some(event) = serve.next(client).await {
        let lines = match event {
            ServeEvent::Connecting { .. } => continue,
            ServeEvent::Connected { .. } => {
                eprintln!("connected");
                continue;
            }
            ServeEvent::Disconnected { reason, retry_in } => {
                eprintln!(
                    "disconnected: {}; retrying in {:.1}s",
                    escape(&reason),
                    retry_in.as_secs_f64()
                );
                continue;
            }
            ServeEvent::Incoming(incoming) => incoming_json(client, incoming),
            // A local failure (the disk): reported, and the listener keeps going.
            ServeEvent::Failed(message) => vec![json!({ "type": "error", "message": message })],
            // How many messages waited while this user was away (after them, live traffic).
            ServeEvent::Backlog(count) => vec![json!({ "type": "backlog", "count": count })],
            ServeEvent::Notice(code, message) => vec![json!({
                "type": "notice", "code": code.name(), "message": message,
            })],
        };
        let mut out = std::io::stdout().lock();
        for line in lines {
            writeln!(out, "{}", syncra_core::text::json_inert(&line.to_string()))?;
        }
        out.flush()?;
    }
    Ok(())
}

fn incoming_json(client: &Client, incoming: Incoming) -> Vec<serde_json::Value> {
    match incoming {
        Incoming::Message { .. } => incoming
            .shown()
            .into_iter()
            .map(|line| {
                let group_id = match &line.target {
                    Target::Group(g) => Some(g.clone()),
                    Target::Direct(_) => None,
                };
                let kind = match (line.event, line.request) {
                    (true, _) => "group_event",
                    (false, true) => "request",
                    (false, false) => "message",
                };
                let mut value = json!({
                    "type": kind,
                    "from": line.from.to_string(),
                    "from_handle": line.from_name,
                    "group": line.group_name,
                    "group_id": group_id,
                    "timestamp_ms": line.timestamp_ms,
                    "text": line.text,
                });
                if !line.event {
                    value["id"] = json!(line.id);
                }
                value
            })
            .collect(),
        Incoming::Held { handle, from } => vec![json!({
            "type": "held",
            "from": from.to_string(),
            "from_handle": handle,
            "reason": format!(
                "the identity key of {handle} changed; the message is held until you run \
                 `syncra verify {handle}` and mark it verified"
            ),
        })],
        Incoming::Rejected { reason } => vec![json!({
            "type": "rejected",
            "reason": reason,
            "count": client.rejected_count(),
        })],
        Incoming::Notice(message) => vec![json!({ "type": "notice", "message": message })],
    }
}

//! The `syncra-relay` binary: configuration, logging and signals around [`syncra_relay::run`].

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use syncra_relay::RelayConfig;
use tracing_subscriber::EnvFilter;

/// The Syncra blind relay: forwards sealed envelopes it cannot open.
///
/// With no configuration it serves on 127.0.0.1:7443 with an in-process broker and a SQLite
/// identity store in its data directory. A TOML file (--config) and SYNCRA_* environment
/// variables (`__` for nesting, e.g. SYNCRA_BROKER__KIND=nats) override the defaults.
#[derive(Parser, Debug)]
#[command(name = "syncra-relay", version)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, short, env = "SYNCRA_RELAY_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the relay (the default).
    Serve,
    /// Print the effective configuration (secrets redacted) and exit.
    Config,
    /// Run the identity store's database migrations and exit (the relay also runs them at
    /// start; this is for deployments that migrate as a separate step).
    Migrate,
    /// Delete a registered user by handle or user id. Its handle becomes free and every resume
    /// token issued to it stops working on every node (sessions open now end at their next
    /// resume; restart the nodes to end them at once).
    DeleteUser {
        /// The handle or user id.
        who: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = RelayConfig::load(cli.config.as_deref())?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Config => {
            print!("{}", config.to_redacted_toml()?);
            Ok(())
        }
        Command::Migrate => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(syncra_relay::migrate(&config))
        }
        Command::DeleteUser { who } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let deleted = runtime.block_on(syncra_relay::delete_user(&config, &who))?;
            println!("deleted user {deleted}; its resume tokens are revoked");
            Ok(())
        }
        Command::Serve => {
            let filter = EnvFilter::try_from_default_env()
                .or_else(|_| EnvFilter::try_new(&config.log))
                .context("invalid log filter")?;
            // Colour only on a terminal: log files and journald get plain text.
            let colour = std::io::IsTerminal::is_terminal(&std::io::stdout())
                && std::env::var_os("NO_COLOR").is_none();
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_target(false)
                .with_ansi(colour)
                .init();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(syncra_relay::run(config, shutdown_signal()))
        }
    }
}

/// Completes on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

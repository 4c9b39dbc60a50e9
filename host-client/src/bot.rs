//! Bots and client extensions: WebAssembly components of the `bot` world, run in the Wasmtime
//! sandbox (`syncra-plugin-wasm`) with the client's own identity and sealing path.
//!
//! A bot sees only messages addressed to its identity, already opened and verified; it answers
//! with actions (reply, send) that this host carries out through [`Client`]. It never sees a key.
//! A plugin call is bounded by its fuel budget and runs off the async runtime's threads.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use syncra_core::text::escape_untrusted;

use anyhow::Context;
use syncra_plugin_wasm::{BotAction, BotMessage, BotPlugin, StoreKey, WasmHost, WasmPluginConfig};

use crate::client::{Client, ClientError, Incoming, Serve, ServeEvent, Target};

/// The process-wide Wasmtime engine.
pub fn wasm_host() -> anyhow::Result<&'static WasmHost> {
    static HOST: OnceLock<WasmHost> = OnceLock::new();
    if let Some(h) = HOST.get() {
        return Ok(h);
    }
    let h = WasmHost::new().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(HOST.get_or_init(|| h))
}

/// Loads a bot component, keeping its private store under `store_dir` (`NAME.kv`) unless the
/// config says otherwise, sealed with `key` (the identity's storage key, see
/// [`Client::plugin_store_key`]) like the rest of the client's state at rest.
pub fn load(
    mut config: WasmPluginConfig,
    store_dir: &Path,
    key: StoreKey,
) -> anyhow::Result<Arc<BotPlugin>> {
    if config.kv_file.is_none() {
        let name = config.name();
        check_name(&name).context(
            "its store file is named after it: give it another name (`--name`, or `name` in \
             its settings entry) or a `kv_file`",
        )?;
        config.kv_file = Some(store_dir.join(format!("{name}.kv")));
    }
    config.kv_key = Some(key);
    let plugin = BotPlugin::load(wasm_host()?, config).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Arc::new(plugin))
}

/// Runs a plugin call on a blocking thread: a call may use its whole fuel budget.
pub async fn call<R: Send + 'static>(
    plugin: &Arc<BotPlugin>,
    f: impl FnOnce(&BotPlugin) -> Result<R, syncra_plugin_wasm::WasmError> + Send + 'static,
) -> anyhow::Result<R> {
    let p = plugin.clone();
    tokio::task::spawn_blocking(move || f(&p))
        .await
        .context("a plugin call panicked")?
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Checks a bot's name (`--name`, an extension's `name`, else its file's stem): it names the
/// bot's store file, so only letters, digits, `-`, `_` and `.` (not first, never two in a
/// row), 1 to 64 of them.
pub fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && !name.contains("..")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        anyhow::bail!(
            "bot name {:?} is not usable: use 1 to 64 letters, digits, -, _ or . (not first, \
             not two in a row)",
            escape_untrusted(name)
        );
    }
    Ok(())
}

/// The largest text a bot may send in one reply or send, in bytes. It keeps the sealed message
/// under the envelope's body limit (256 KiB with the message's own fields) and well under the
/// relay's frame limit; a longer text is refused at once with a log line, never queued (it
/// could never leave the outbox).
pub const MAX_BOT_TEXT: usize = syncra_core::ui::MAX_MESSAGE_TEXT;

/// Refuses a bot text over [`MAX_BOT_TEXT`], saying so.
pub fn check_bot_text(text: &str) -> Result<(), ClientError> {
    if text.len() > MAX_BOT_TEXT {
        return Err(ClientError::Invalid(format!(
            "the bot's message of {} bytes is over the {MAX_BOT_TEXT}-byte limit for one \
             message; it was not sent (split it into several)",
            text.len()
        )));
    }
    Ok(())
}

/// Actions one plugin call may ask for: each sends a message as the user, durably, so a
/// plugin returning thousands would hold the session for as long as they take. The rest are
/// refused with one error.
pub const MAX_BOT_ACTIONS: usize = 16;

/// The commands a plugin declared, for a person to read: each name escaped (a plugin chooses
/// it, and could put terminal escapes in it), at most 32 of them, each cut at 64 characters.
pub fn command_list(commands: &[syncra_plugin_wasm::BotCommand]) -> String {
    const SHOWN: usize = 32;
    const NAME: usize = 64;
    let mut names: Vec<String> = commands
        .iter()
        .take(SHOWN)
        .map(|c| {
            let name: String = c.name.chars().take(NAME).collect();
            format!("/{}", escape_untrusted(&name))
        })
        .collect();
    if commands.len() > SHOWN {
        names.push(format!("and {} more", commands.len() - SHOWN));
    }
    names.join(", ")
}

/// Carries out a plugin's actions: replies go to `reply_to`, sends to whoever they name. At
/// most [`MAX_BOT_ACTIONS`]; beyond them, one error for the rest.
pub async fn perform(
    client: &mut Client,
    reply_to: &Target,
    mut actions: Vec<BotAction>,
) -> Vec<Result<crate::SendReport, ClientError>> {
    let mut out = Vec::new();
    let over = actions.len().saturating_sub(MAX_BOT_ACTIONS);
    actions.truncate(MAX_BOT_ACTIONS);
    for action in actions {
        let result = match action {
            BotAction::Reply(text) => {
                match check_bot_text(&text).and_then(|()| client.queue(reply_to, &text)) {
                    Ok(pending) => client.send_queued(&pending).await,
                    Err(e) => Err(e),
                }
            }
            BotAction::Send(o) => match check_bot_text(&o.text) {
                Ok(()) => client.send_text(&o.to, &o.text).await,
                Err(e) => Err(e),
            },
        };
        if let Err(e) = &result {
            tracing::warn!("a plugin action failed: {e:#}");
        }
        out.push(result);
    }
    if over > 0 {
        let e = ClientError::Invalid(format!(
            "the plugin asked for {} actions in one call; the first {MAX_BOT_ACTIONS} were \
             carried out and the other {over} refused",
            over + MAX_BOT_ACTIONS
        ));
        tracing::warn!("{e}");
        out.push(Err(e));
    }
    out
}

/// Hands one incoming message to a bot and carries out its answer. Group events and
/// anything that is not a message are not given to bots.
pub async fn handle_incoming(client: &mut Client, plugin: &Arc<BotPlugin>, incoming: &Incoming) {
    for line in incoming.shown().into_iter().filter(|l| !l.event) {
        let target = line.target.clone();
        let message = BotMessage {
            id: line.id,
            sender: line.from.to_string(),
            sender_handle: Some(line.from_name),
            group: line.group_name,
            text: line.text,
            timestamp_ms: line.timestamp_ms,
        };
        if plugin.is_disabled() {
            // Never "delivered" and then silence: the sender is told.
            perform(client, &target, vec![BotAction::Reply(UNAVAILABLE.into())]).await;
            continue;
        }
        match call(plugin, move |p| p.on_message(&message)).await {
            Ok(actions) => {
                perform(client, &target, actions).await;
            }
            // The plugin was restarted (or disabled) and said so in the log; the bot keeps
            // serving.
            Err(e) => {
                tracing::warn!("{}", escape_untrusted(&format!("{e:#}")));
                if plugin.is_disabled() {
                    perform(client, &target, vec![BotAction::Reply(UNAVAILABLE.into())]).await;
                }
            }
        }
    }
}

/// What a bot whose plugin was disabled answers every message with, so senders learn it
/// instead of seeing "delivered" and hearing nothing.
pub const UNAVAILABLE: &str = "this bot is unavailable: its plugin was stopped after repeated \
     failures, and its operator has to restart it";

/// Runs a bot until `stop` completes: connects (and reconnects with backoff), drains the outbox,
/// answers every message.
pub async fn run(
    client: &mut Client,
    plugin: Arc<BotPlugin>,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut serve = Serve::new(client, stop)?;
    while let Some(event) = serve.next(client).await {
        match event {
            ServeEvent::Connecting { .. } => {}
            ServeEvent::Connected { .. } => tracing::info!(bot = plugin.name(), "connected"),
            ServeEvent::Disconnected { reason, retry_in } => tracing::warn!(
                "disconnected: {}; retrying in {:.1}s",
                escape_untrusted(&reason),
                retry_in.as_secs_f64()
            ),
            // Live, or what arrived while the bot was down (acknowledged once filed). Nothing a
            // peer sends stops the bot: a bad delivery is reported and skipped.
            ServeEvent::Incoming(incoming) => handle_incoming(client, &plugin, &incoming).await,
            ServeEvent::Failed(message) => tracing::warn!("{}", escape_untrusted(&message)),
            ServeEvent::Backlog(count) => {
                tracing::info!("{count} messages arrived while the bot was away");
            }
            ServeEvent::Notice(code, message) => {
                tracing::info!("relay notice ({code}): {}", escape_untrusted(&message));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plugin chooses its command names: they reach the terminal escaped, cut, and at most
    /// 32 of them (an OSC 52 sequence would otherwise write the person's clipboard).
    #[test]
    fn command_names_are_inert_and_bounded() {
        let command = |name: &str| syncra_plugin_wasm::BotCommand {
            name: name.to_owned(),
            help: String::new(),
        };
        let shown = command_list(&[
            command("roll"),
            command("x\u{1b}]52;c;aGk=\u{7}"),
            command("\u{202e}txt.exe"),
            command(&"n".repeat(500)),
        ]);
        assert!(
            !shown.chars().any(syncra_core::text::is_unsafe_char),
            "{shown}"
        );
        assert!(
            shown.starts_with("/roll, /x\\u{1b}]52;c;aGk=\\u{7}, /\\u{202e}txt.exe, "),
            "{shown}"
        );
        assert!(shown.ends_with(&format!("/{}", "n".repeat(64))), "{shown}");
        let many: Vec<_> = (0..100).map(|i| command(&format!("c{i}"))).collect();
        let shown = command_list(&many);
        assert!(shown.ends_with("/c31, and 68 more"), "{shown}");
    }

    /// A store file named after an extension whose name is not plain (a name from the
    /// settings, or a file stem starting with a dot) is refused before anything loads: before,
    /// the name went into the path as it was (`../x` wrote outside `plugins/`).
    #[test]
    fn a_bot_whose_name_cannot_name_its_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = StoreKey(syncra_core::crypto::local_box::LocalKey::generate());
        let mut named = WasmPluginConfig::new(dir.path().join("ok.wasm"));
        named.name = Some("../outside".into());
        let stem = WasmPluginConfig::new(dir.path().join(".hidden.wasm"));
        for config in [named, stem] {
            let err = load(config, dir.path(), key.clone()).err().unwrap();
            let err = format!("{err:#}");
            assert!(err.contains("is not usable"), "{err}");
            assert!(err.contains("give it another name"), "{err}");
        }
    }

    #[test]
    fn bot_names_name_a_file_so_they_are_plain() {
        for ok in ["greeter", "dice-2", "my_bot", "dice.v2"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "../x",
            "a/b",
            "a b",
            ".hidden",
            "a..b",
            "..",
            &"n".repeat(65),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_bot_text_over_the_limit_is_refused_with_its_size() {
        assert!(check_bot_text(&"x".repeat(MAX_BOT_TEXT)).is_ok());
        let err = check_bot_text(&"x".repeat(2 * 1024 * 1024)).unwrap_err();
        assert!(err.to_string().contains("2097152 bytes"), "{err}");
    }
}

//! The client's home directory (`$SYNCRA_HOME`, default `~/.syncra`) and its settings.
//!
//! The directory is created 0700; every file with secrets in it is written 0600. A home that
//! exists but cannot be read is an error that names the path — never a reason to start over,
//! because starting over would mean a new identity and lost history.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use syncra_core::crypto::keyfile::{create_private_dir, write_private};

/// How often history writes are flushed to disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// After every line (safest; the default).
    #[default]
    Always,
    /// Never explicitly; the OS flushes eventually (fastest).
    Never,
}

/// The client's settings (`settings.toml`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// The relay to use, e.g. `ws://127.0.0.1:7443/` or `wss://relay.example/`.
    pub relay: Option<String>,
    /// The relay's id, pinned at registration: a server whose challenge names another relay
    /// is refused (it could be passing another relay's challenge on to log in there as you).
    pub relay_id: Option<String>,
    /// The handle registered on that relay.
    pub handle: Option<String>,
    /// A PEM file of CA certificates to trust for the relay instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// Allow plaintext `ws://` to a relay that is not on this machine (labs only; a warning
    /// is printed on every connection). Loopback `ws://` is always allowed.
    pub insecure_plaintext: bool,
    /// When history writes reach the disk.
    pub fsync: FsyncPolicy,
    /// Days between prekey rotations.
    pub prekey_rotation_days: u64,
    /// Days a retired prekey is kept so late messages still open.
    pub prekey_grace_days: u64,
    /// Ring the terminal bell for messages in background conversations (TUI).
    pub bell: bool,
    /// Which frontend `syncra` opens: `ratatui` or `line`.
    pub frontend: String,
    /// Keys and colours of the terminal UI (`[ui.keys]`, `[ui.theme]`).
    pub ui: syncra_ui_ratatui::config::UiSettings,
    /// Client extensions: WebAssembly components of the `bot` world whose commands appear in
    /// the command palette (`[[plugins]]` with `path`, optional `grants`, `memory_mib`...).
    pub plugins: Vec<syncra_plugin_wasm::WasmPluginConfig>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            relay: None,
            relay_id: None,
            handle: None,
            ca_file: None,
            insecure_plaintext: false,
            fsync: FsyncPolicy::Always,
            prekey_rotation_days: 7,
            prekey_grace_days: 7,
            bell: true,
            frontend: "ratatui".into(),
            ui: Default::default(),
            plugins: Vec::new(),
        }
    }
}

/// Paths inside a home directory.
#[derive(Clone, Debug)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// The home from `$SYNCRA_HOME`, else `~/.syncra`.
    pub fn from_env() -> anyhow::Result<Home> {
        if let Some(dir) = std::env::var_os("SYNCRA_HOME").filter(|v| !v.is_empty()) {
            return Ok(Home::at(PathBuf::from(dir)));
        }
        let home = std::env::var_os("HOME")
            .filter(|v| !v.is_empty())
            .context("neither SYNCRA_HOME nor HOME is set; set SYNCRA_HOME to a directory")?;
        Ok(Home::at(PathBuf::from(home).join(".syncra")))
    }

    /// A home at an explicit path.
    pub fn at(root: PathBuf) -> Home {
        Home { root }
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The key file.
    pub fn key_file(&self) -> PathBuf {
        self.root.join("identity.key")
    }

    /// The settings file.
    pub fn settings_file(&self) -> PathBuf {
        self.root.join("settings.toml")
    }

    /// The contacts file (encrypted; older versions kept a plaintext `contacts.json`).
    pub fn contacts_file(&self) -> PathBuf {
        self.root.join("contacts.sealed")
    }

    /// The groups file (encrypted; older versions kept a plaintext `groups.json`).
    pub fn groups_file(&self) -> PathBuf {
        self.root.join("groups.sealed")
    }

    /// The chat logs directory.
    pub fn chats_dir(&self) -> PathBuf {
        self.root.join("chats")
    }

    /// The outbox directory.
    pub fn outbox_dir(&self) -> PathBuf {
        self.root.join("outbox")
    }

    /// The MLS state directory: each conversation's group state and the KeyPackage store,
    /// sealed with the storage key (docs/PROTOCOL.md §9.5).
    pub fn mls_dir(&self) -> PathBuf {
        self.root.join("mls")
    }

    /// Messages opened by MLS that wait to be filed (a stranger's, during the lookup of their
    /// handle), sealed with the storage key; filed at the next start after a crash.
    pub fn spool_dir(&self) -> PathBuf {
        self.root.join("spool")
    }

    /// Whether an identity exists here.
    pub fn has_identity(&self) -> bool {
        self.key_file().exists()
    }

    /// Creates the directory tree (0700), checking that an existing one is usable.
    pub fn ensure(&self) -> anyhow::Result<()> {
        if self.root.exists() {
            std::fs::read_dir(&self.root).with_context(|| {
                format!(
                    "SYNCRA_HOME {} exists but cannot be read; fix its permissions \
                     (nothing was changed)",
                    self.root.display()
                )
            })?;
        }
        for dir in [self.root.clone(), self.chats_dir(), self.outbox_dir()] {
            create_private_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(())
    }

    /// Loads settings (defaults if the file does not exist).
    pub fn settings(&self) -> anyhow::Result<Settings> {
        let path = self.settings_file();
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text)
                .with_context(|| format!("invalid settings in {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Settings::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Saves settings.
    pub fn save_settings(&self, settings: &Settings) -> anyhow::Result<()> {
        let text = toml::to_string_pretty(settings).context("serialising settings")?;
        write_private(&self.settings_file(), text.as_bytes())?;
        Ok(())
    }

    /// Fails unless an identity exists, with a message that says what to do.
    pub fn require_identity(&self) -> anyhow::Result<()> {
        if !self.root.exists() {
            bail!(
                "no Syncra home at {}; run `syncra init` first (or set SYNCRA_HOME)",
                self.root.display()
            );
        }
        self.ensure()?;
        if !self.has_identity() {
            bail!(
                "no identity in {}; run `syncra init` first",
                self.root.display()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_settings_parse() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/TUI.md"))
            .unwrap();
        let toml_block = doc
            .split("```toml\n")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .unwrap();
        let s: Settings = toml::from_str(toml_block).unwrap();
        assert_eq!(s.frontend, "ratatui");
        assert_eq!(s.ui.keys.len(), 11);
        let keymap = syncra_ui_ratatui::config::Keymap::with_overrides(&s.ui.keys).unwrap();
        assert_eq!(keymap, syncra_ui_ratatui::config::Keymap::default());
        assert!(toml::from_str::<Settings>("frontnd = \"line\"").is_err());
    }
}

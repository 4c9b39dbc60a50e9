//! Relay configuration: defaults, a TOML file and `SYNCRA_` environment variables (figment).
//!
//! Every default is safe and runnable on one laptop: loopback listener, in-process broker,
//! SQLite in a private data directory. Unknown keys are errors that name the key and the file.
//! Plugin sections (`[transport]`, `[broker]`, `[store]`) are checked by the plugin's own typed
//! config when it is created, with the same strictness.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The environment variable prefix; `__` separates nesting (`SYNCRA_BROKER__KIND=nats`).
pub const ENV_PREFIX: &str = "SYNCRA_";

/// `SYNCRA_*` variables that belong to other Syncra programs (the client, the test suite) and
/// are therefore not relay settings. Any other `SYNCRA_*` variable must name a relay setting:
/// a typo in the environment is an error, as it is in the file.
const OTHER_PROGRAMS_VARS: &[&str] = &[
    "SYNCRA_HOME",
    "SYNCRA_PASSPHRASE",
    "SYNCRA_RELAY_CONFIG",
    "SYNCRA_REGENERATE_VECTORS",
    "SYNCRA_ADVISORIES",
];

/// Top-level keys, so unrelated `SYNCRA_*` variables (the client's `SYNCRA_HOME`,
/// `SYNCRA_PASSPHRASE`) are not mistaken for relay settings.
const TOP_LEVEL_KEYS: &[&str] = &[
    "relay_id",
    "data_dir",
    "listen",
    "admin_listen",
    "log",
    "transport",
    "broker",
    "store",
    "mailbox",
    "auth",
    "limits",
    "plugins",
];

/// The whole relay configuration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// The relay's (cluster's) identity, bound into every login and registration proof so a
    /// proof made for one relay cannot be replayed to another. All nodes of a cluster share it.
    pub relay_id: String,
    /// Where the relay keeps its files (SQLite database, token signing key). Created 0700.
    pub data_dir: PathBuf,
    /// Where clients connect.
    pub listen: String,
    /// Where `/healthz` and `/metrics` are served. Empty disables the admin endpoint.
    pub admin_listen: String,
    /// Log filter (tracing `EnvFilter` syntax); `RUST_LOG` overrides it.
    pub log: String,
    /// Transport plugin section (`kind` plus its own keys).
    pub transport: serde_json::Value,
    /// Broker plugin section.
    pub broker: serde_json::Value,
    /// Identity store plugin section.
    pub store: serde_json::Value,
    /// Mailbox plugin section: `kind` (`sqlite`, `postgres`, `redis`, `nats` or `none`), the
    /// common bounds (`ttl_secs`, `max_entries_per_recipient`, `max_bytes_per_recipient`) and
    /// the kind's own keys (see [`RelayConfig::mailbox_settings`]).
    #[serde(default = "default_mailbox")]
    pub mailbox: serde_json::Value,
    /// Authentication settings.
    pub auth: AuthConfig,
    /// Limits.
    pub limits: LimitsConfig,
    /// Native broker plugins and WASM relay hooks (`[[plugins]]`, see docs/CONFIG.md).
    #[serde(default)]
    pub plugins: Vec<serde_json::Value>,
    /// The file this configuration was read from, for error messages.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// Authentication settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Lifetime of a resume token.
    pub token_ttl_secs: u64,
    /// File with the Ed25519 seed that signs resume tokens. Created (0600) if missing. Every
    /// node of a cluster must use the same key so that a token from one node resumes on another.
    /// Relative paths are relative to `data_dir`.
    pub token_key_file: PathBuf,
    /// Failed authentication attempts allowed per connection before it is closed.
    pub max_attempts_per_connection: u32,
    /// Authentication attempts (register, auth, resume) per client address per minute.
    pub attempts_per_minute_per_address: u32,
    /// Handle lookups per client address per minute before login (after login, lookups count
    /// against the ordinary frame budget).
    pub lookups_per_minute_per_address: u32,
    /// How long a chain of resumes may go on after the last login with the identity key. Past
    /// it a resume is refused (`token_expired`) and the client logs in with its key again.
    pub session_max_lifetime_secs: u64,
    /// The URLs clients dial to reach this relay (as clients write them, e.g.
    /// `wss://chat.example.org/`). Logins sign the URL the client dialled; when this list is
    /// not empty, a login signed for any other URL is refused, so a relay that passes this
    /// relay's challenges through to its own users cannot log in here as them. Empty accepts
    /// any URL (a relay on loopback, or one whose address is not known in advance).
    pub public_urls: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            token_ttl_secs: 15 * 60,
            token_key_file: PathBuf::from("token-signing.key"),
            max_attempts_per_connection: 3,
            attempts_per_minute_per_address: 30,
            lookups_per_minute_per_address: 30,
            session_max_lifetime_secs: 24 * 3600,
            public_urls: Vec::new(),
        }
    }
}

/// What to do when a session's outbound queue is full.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OverflowPolicy {
    /// Refuse the message for that session (the sender gets `rejected: queue_overflow` if no
    /// other session of the recipient took it) and tell the slow client how many it missed.
    Reject,
    /// Close the slow session with `queue_overflow`. The relay stores nothing, so what was
    /// refused is not replayed; the senders were told `rejected: queue_overflow`.
    Disconnect,
}

/// Limits. Each one, when hit, produces its own error code.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest frame accepted, in bytes.
    pub max_frame: usize,
    /// Messages (sends) per second per user, sustained.
    pub messages_per_second_per_user: u32,
    /// Burst allowance per user.
    pub message_burst_per_user: u32,
    /// Messages per second per client address, sustained (covers many users behind one
    /// address and unauthenticated floods).
    pub messages_per_second_per_address: u32,
    /// Burst allowance per address.
    pub message_burst_per_address: u32,
    /// Simultaneous connections per client address.
    pub connections_per_address: u32,
    /// Time to complete the TLS/WebSocket handshake and authenticate.
    pub handshake_timeout_secs: u64,
    /// Connections in their handshake or login at once; more are dropped at accept.
    pub pending_handshakes: usize,
    /// A session that sends nothing (not even a ping) for this long is closed.
    pub idle_timeout_secs: u64,
    /// Frames queued per session before the overflow policy applies.
    pub queue_capacity: usize,
    /// Frames written per batch by a session's writer.
    pub write_batch: usize,
    /// What to do when a session's queue is full.
    pub overflow: OverflowPolicy,
    /// How long SIGTERM waits for sessions to drain before closing them.
    pub drain_timeout_secs: u64,
    /// Most recipients one send may name (the envelope format allows 512).
    pub max_recipients_per_send: usize,
    /// Fan-out budget per user, sustained: bytes the relay emits on the user's behalf (envelope
    /// size × recipients) per second.
    pub fanout_bytes_per_second_per_user: u32,
    /// Fan-out burst per user, in bytes. A single send that costs more is refused outright.
    pub fanout_burst_bytes_per_user: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_frame: syncra_core::wire::DEFAULT_MAX_FRAME,
            messages_per_second_per_user: 50,
            message_burst_per_user: 200,
            messages_per_second_per_address: 500,
            message_burst_per_address: 2000,
            connections_per_address: 64,
            handshake_timeout_secs: 10,
            pending_handshakes: 1024,
            idle_timeout_secs: 120,
            queue_capacity: 1024,
            write_batch: 64,
            overflow: OverflowPolicy::Reject,
            drain_timeout_secs: 5,
            max_recipients_per_send: 128,
            fanout_bytes_per_second_per_user: 8 * 1024 * 1024,
            fanout_burst_bytes_per_user: 64 * 1024 * 1024,
        }
    }
}

fn default_mailbox() -> serde_json::Value {
    serde_json::json!({ "kind": "sqlite" })
}

/// The mailbox keys every kind shares.
const MAILBOX_COMMON: [&str; 3] = [
    "ttl_secs",
    "max_entries_per_recipient",
    "max_bytes_per_recipient",
];

/// The default data directory: `$XDG_DATA_HOME/syncra-relay`, else
/// `~/.local/share/syncra-relay`, else `./syncra-relay-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("syncra-relay");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home)
            .join(".local")
            .join("share")
            .join("syncra-relay");
    }
    PathBuf::from("syncra-relay-data")
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            relay_id: "syncra-local".into(),
            data_dir: default_data_dir(),
            listen: "127.0.0.1:7443".into(),
            admin_listen: "127.0.0.1:7444".into(),
            log: "info".into(),
            transport: serde_json::json!({ "kind": "ws" }),
            broker: serde_json::json!({ "kind": "memory" }),
            // The SQLite path is filled in from `data_dir` when absent; see `store_section`.
            store: serde_json::json!({ "kind": "sqlite" }),
            // The SQLite path is filled in from `data_dir` when absent; see `mailbox_settings`.
            mailbox: default_mailbox(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            plugins: Vec::new(),
            source: None,
        }
    }
}

/// Turns `SYNCRA_A__B=v` variables into a nested dictionary `{a: {b: v}}`, parsing values the
/// way figment's `Env` provider does (`7` is a number, `true` a boolean). Only relay keys are
/// taken, so the client's `SYNCRA_HOME` or `SYNCRA_PASSPHRASE` are never read here.
fn env_dict(
    env: impl IntoIterator<Item = (String, String)>,
) -> anyhow::Result<figment::value::Dict> {
    use figment::value::{Dict, Value};
    let mut root = Dict::new();
    for (key, raw) in env {
        let Some(rest) = key.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if OTHER_PROGRAMS_VARS.contains(&key.as_str()) {
            continue;
        }
        let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
        if path.iter().any(String::is_empty) || !TOP_LEVEL_KEYS.contains(&path[0].as_str()) {
            bail!(
                "unknown setting {key} in the environment; relay settings are {} \
                 (nested with __, e.g. SYNCRA_BROKER__KIND)",
                TOP_LEVEL_KEYS
                    .iter()
                    .map(|k| format!("SYNCRA_{}", k.to_ascii_uppercase()))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let value: Value = raw.parse().unwrap_or_else(|_| Value::from(raw.clone()));
        let mut dict = &mut root;
        for segment in &path[..path.len() - 1] {
            let entry = dict
                .entry(segment.clone())
                .or_insert_with(|| Value::from(Dict::new()));
            if entry.as_dict().is_none() {
                *entry = Value::from(Dict::new());
            }
            let Value::Dict(_, inner) = entry else {
                unreachable!("just made a dict")
            };
            dict = inner;
        }
        dict.insert(path[path.len() - 1].clone(), value);
    }
    Ok(root)
}

/// Where a setting came from, for error messages.
fn describe(file: Option<&Path>) -> String {
    match file {
        Some(f) => format!("{} (or SYNCRA_* environment variables)", f.display()),
        None => "SYNCRA_* environment variables".into(),
    }
}

impl RelayConfig {
    /// Loads defaults, then the file (if given), then the environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        Self::load_with_env(file, std::env::vars())
    }

    /// Like [`RelayConfig::load`] with an explicit environment (tests).
    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(RelayConfig::default()));
        if let Some(path) = file {
            if !path.exists() {
                bail!("config file {} does not exist", path.display());
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(Serialized::globals(env_dict(env)?));
        let mut config: RelayConfig = figment
            .extract()
            .map_err(|e| anyhow::anyhow!("invalid configuration in {}: {e}", describe(file)))?;
        config.validate().with_context(|| describe(file))?;
        config.source = file.map(Path::to_path_buf);
        if let Some(dir) = file.and_then(Path::parent) {
            // Relative paths in a config file are relative to the file.
            if config.data_dir.is_relative() && !dir.as_os_str().is_empty() {
                config.data_dir = dir.join(&config.data_dir);
            }
        }
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.relay_id.is_empty() || self.relay_id.len() > syncra_core::wire::MAX_RELAY_ID_LEN {
            bail!("relay_id must be 1 to 255 bytes");
        }
        for (name, section) in [
            ("transport", &self.transport),
            ("broker", &self.broker),
            ("store", &self.store),
            ("mailbox", &self.mailbox),
        ] {
            match section.get("kind") {
                Some(serde_json::Value::String(_)) => {}
                _ => bail!("[{name}] needs a `kind` (a string)"),
            }
        }
        if self.transport.get("max_frame").is_some() {
            bail!("[transport] max_frame is set from [limits] max_frame; set it there instead");
        }
        self.mailbox_settings()?;
        if self.limits.queue_capacity == 0
            || self.limits.write_batch == 0
            || self.limits.pending_handshakes == 0
        {
            bail!(
                "limits.queue_capacity, limits.write_batch and limits.pending_handshakes must be \
                 at least 1"
            );
        }
        if self.limits.idle_timeout_secs == 0 {
            bail!(
                "limits.idle_timeout_secs must be at least 1 (a session that pings is never idle)"
            );
        }
        if self.limits.max_frame < 1024 || self.limits.max_frame > 16 * 1024 * 1024 {
            bail!("limits.max_frame must be between 1 KiB and 16 MiB");
        }
        let max_recipients = syncra_core::crypto::envelope::MAX_RECIPIENTS;
        if self.limits.max_recipients_per_send == 0
            || self.limits.max_recipients_per_send > max_recipients
        {
            bail!("limits.max_recipients_per_send must be between 1 and {max_recipients}");
        }
        if (self.limits.fanout_burst_bytes_per_user as usize) < self.limits.max_frame {
            bail!(
                "limits.fanout_burst_bytes_per_user ({}) must be at least limits.max_frame ({}): \
                 otherwise a message of the largest size could not be sent even to one recipient",
                self.limits.fanout_burst_bytes_per_user,
                self.limits.max_frame
            );
        }
        if self.limits.fanout_bytes_per_second_per_user == 0 {
            bail!("limits.fanout_bytes_per_second_per_user must be at least 1");
        }
        if self.auth.session_max_lifetime_secs < self.auth.token_ttl_secs {
            bail!(
                "auth.session_max_lifetime_secs ({}) must be at least auth.token_ttl_secs ({})",
                self.auth.session_max_lifetime_secs,
                self.auth.token_ttl_secs
            );
        }
        for url in &self.auth.public_urls {
            if !(url.starts_with("ws://") || url.starts_with("wss://"))
                || url.len() > syncra_core::wire::MAX_URL_LEN
            {
                bail!("auth.public_urls: {url:?} is not a ws:// or wss:// URL");
            }
        }
        Ok(())
    }

    /// Where the settings came from, for error messages.
    pub fn describe_source(&self) -> String {
        describe(self.source.as_deref())
    }

    /// The store section with defaults that depend on other settings filled in.
    pub fn store_section(&self) -> serde_json::Value {
        let mut store = self.store.clone();
        if store.get("kind").and_then(|k| k.as_str()) == Some("sqlite")
            && store.get("path").is_none()
            && let Some(map) = store.as_object_mut()
        {
            map.insert(
                "path".into(),
                serde_json::Value::String(
                    self.data_dir
                        .join("identities.db")
                        .to_string_lossy()
                        .into_owned(),
                ),
            );
        }
        store
    }

    /// The mailbox section for its plugin (the common bounds taken out, the SQLite path filled
    /// in from `data_dir` when absent) and the bounds every kind applies.
    pub fn mailbox_settings(
        &self,
    ) -> anyhow::Result<(serde_json::Value, syncra_core::mailbox::MailboxLimits)> {
        let mut section = self.mailbox.clone();
        let Some(map) = section.as_object_mut() else {
            bail!("[mailbox] must be a table with a `kind`");
        };
        let d = syncra_core::mailbox::MailboxLimits::default();
        let mut values = [d.ttl_ms / 1000, d.max_entries, d.max_bytes];
        for (key, value) in MAILBOX_COMMON.iter().zip(values.iter_mut()) {
            *value = match map.remove(*key) {
                None => *value,
                Some(v) => match v.as_u64() {
                    Some(n) if n > 0 => n,
                    _ => bail!("mailbox.{key} must be a whole number above 0, not {v}"),
                },
            };
        }
        if map.get("kind").and_then(|k| k.as_str()) == Some("sqlite") && !map.contains_key("path") {
            map.insert(
                "path".into(),
                serde_json::Value::String(
                    self.data_dir
                        .join("mailbox.db")
                        .to_string_lossy()
                        .into_owned(),
                ),
            );
        }
        let limits = syncra_core::mailbox::MailboxLimits {
            ttl_ms: values[0].saturating_mul(1000),
            max_entries: values[1],
            max_bytes: values[2],
        };
        Ok((section, limits))
    }

    /// The transport section, with the relay's frame limit passed down.
    pub fn transport_section(&self) -> serde_json::Value {
        let mut t = self.transport.clone();
        if let Some(map) = t.as_object_mut() {
            map.insert("max_frame".into(), serde_json::json!(self.limits.max_frame));
        }
        t
    }

    /// The token key file path, resolved against the data directory.
    pub fn token_key_path(&self) -> PathBuf {
        if self.auth.token_key_file.is_absolute() {
            self.auth.token_key_file.clone()
        } else {
            self.data_dir.join(&self.auth.token_key_file)
        }
    }

    /// The effective configuration as TOML, with secrets redacted.
    pub fn to_redacted_toml(&self) -> anyhow::Result<String> {
        let mut value = serde_json::to_value(self)?;
        if let Some(map) = value.as_object_mut() {
            map.insert("store".into(), self.store_section());
        }
        redact(&mut value);
        let toml_value: toml::Value = serde_json::from_value(value)?;
        Ok(toml::to_string_pretty(&toml_value)?)
    }
}

const SECRET_KEYS: &[&str] = &["password", "secret", "token", "private_key", "passphrase"];

/// Replaces secret values: keys that name a secret, and passwords inside URLs.
pub fn redact(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                let k = key.to_ascii_lowercase();
                if SECRET_KEYS.iter().any(|s| k.contains(s))
                    && !k.ends_with("_file")
                    && v.is_string()
                {
                    *v = serde_json::Value::String("<redacted>".into());
                } else {
                    redact(v);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact),
        serde_json::Value::String(s) => *s = syncra_core::redact::redact_url(s),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_runnable_on_a_laptop() {
        let c = RelayConfig::load_with_env(None, env(&[])).unwrap();
        assert!(c.listen.starts_with("127.0.0.1:"));
        assert_eq!(c.broker["kind"], "memory");
        assert_eq!(c.store["kind"], "sqlite");
        assert!(
            c.store_section()["path"]
                .as_str()
                .unwrap()
                .ends_with("identities.db")
        );
        // The no-config relay keeps a mailbox in its data directory, with the documented bounds.
        let (mailbox, limits) = c.mailbox_settings().unwrap();
        assert_eq!(mailbox["kind"], "sqlite");
        assert!(mailbox["path"].as_str().unwrap().ends_with("mailbox.db"));
        assert_eq!(limits, syncra_core::mailbox::MailboxLimits::default());
    }

    #[test]
    fn mailbox_bounds_are_taken_out_of_the_plugin_section_and_checked() {
        let c = RelayConfig::load_with_env(
            None,
            env(&[
                ("SYNCRA_MAILBOX__KIND", "none"),
                ("SYNCRA_MAILBOX__TTL_SECS", "60"),
                ("SYNCRA_MAILBOX__MAX_ENTRIES_PER_RECIPIENT", "3"),
            ]),
        )
        .unwrap();
        let (section, limits) = c.mailbox_settings().unwrap();
        assert_eq!(section, serde_json::json!({ "kind": "none" }));
        assert_eq!((limits.ttl_ms, limits.max_entries), (60_000, 3));
        let err = RelayConfig::load_with_env(None, env(&[("SYNCRA_MAILBOX__TTL_SECS", "0")]))
            .unwrap_err();
        assert!(format!("{err:#}").contains("mailbox.ttl_secs"), "{err:#}");
    }

    #[test]
    fn a_zero_idle_timeout_is_refused_by_name() {
        let err =
            RelayConfig::load_with_env(None, env(&[("SYNCRA_LIMITS__IDLE_TIMEOUT_SECS", "0")]))
                .unwrap_err();
        assert!(
            format!("{err:#}").contains("limits.idle_timeout_secs"),
            "{err:#}"
        );
        let c = RelayConfig::load_with_env(None, env(&[("SYNCRA_LIMITS__IDLE_TIMEOUT_SECS", "1")]))
            .unwrap();
        assert_eq!(c.limits.idle_timeout_secs, 1);
    }

    #[test]
    fn unknown_keys_name_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, "listn = \"127.0.0.1:1\"\n").unwrap();
        let err = format!(
            "{:#}",
            RelayConfig::load_with_env(Some(&path), env(&[])).unwrap_err()
        );
        assert!(err.contains("listn"), "{err}");
        assert!(err.contains("relay.toml"), "{err}");
        std::fs::write(&path, "[limits]\nmax_fram = 5\n").unwrap();
        let err = format!(
            "{:#}",
            RelayConfig::load_with_env(Some(&path), env(&[])).unwrap_err()
        );
        assert!(err.contains("max_fram"), "{err}");
    }

    #[test]
    fn environment_overrides_with_double_underscore_nesting() {
        let c = RelayConfig::load_with_env(
            None,
            env(&[
                ("SYNCRA_BROKER__KIND", "nats"),
                ("SYNCRA_BROKER__URL", "nats://127.0.0.1:4222"),
                ("SYNCRA_LIMITS__QUEUE_CAPACITY", "7"),
                ("SYNCRA_LISTEN", "127.0.0.1:9000"),
                // The client's variables are not relay settings and must not be errors.
                ("SYNCRA_HOME", "/tmp/x"),
                ("SYNCRA_PASSPHRASE", "hunter2"),
                ("PATH", "/usr/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.broker["kind"], "nats");
        assert_eq!(c.broker["url"], "nats://127.0.0.1:4222");
        assert_eq!(c.limits.queue_capacity, 7);
        assert_eq!(c.listen, "127.0.0.1:9000");
    }

    #[test]
    fn a_typo_in_the_environment_is_an_error() {
        let err = RelayConfig::load_with_env(None, env(&[("SYNCRA_LISTN", "127.0.0.1:1")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("SYNCRA_LISTN"), "{err}");
        assert!(err.contains("SYNCRA_LISTEN"), "{err}");
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = RelayConfig::load_with_env(Some(Path::new("/nonexistent/relay.toml")), env(&[]))
            .unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn secrets_are_redacted_when_printed() {
        let c = RelayConfig {
            store: serde_json::json!({
                "kind": "postgres",
                "url": "postgres://syncra:s3cret@db.example:5432/syncra",
                "password": "also-secret",
            }),
            ..RelayConfig::default()
        };
        let printed = c.to_redacted_toml().unwrap();
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(!printed.contains("also-secret"), "{printed}");
        assert!(printed.contains("postgres://syncra:<redacted>@db.example:5432/syncra"));
        let mut v = serde_json::json!({ "url": "nats://s3cret-token@nats.example:4222" });
        redact(&mut v);
        assert_eq!(v["url"], "nats://<redacted>@nats.example:4222");
        let mut v = serde_json::json!({
            "url": "nats://u:one@a:4222,nats://u:two@b:4222",
            "dsn": "postgres://h/db?user=x&password=hunter2",
        });
        redact(&mut v);
        assert_eq!(
            v["url"],
            "nats://u:<redacted>@a:4222,nats://u:<redacted>@b:4222"
        );
        assert_eq!(v["dsn"], "postgres://h/db?user=x&password=<redacted>");
        let mut v = serde_json::json!({ "url": "https://example.org/path@x" });
        redact(&mut v);
        assert_eq!(v["url"], "https://example.org/path@x");
        // File paths that merely mention a secret are not secrets.
        assert!(printed.contains("token-signing.key"), "{printed}");
    }
}

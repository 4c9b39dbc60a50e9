//! Plugins named in the relay's `[[plugins]]` entries: native libraries that add a broker kind
//! to the registry, and WebAssembly relay hooks that see envelope metadata and may allow, deny
//! or delay.
//!
//! ```toml
//! [[plugins]]
//! kind = "native"
//! path = "libsyncra_example_native_broker.so"   # adds its broker kind, e.g. "memory-native"
//!
//! [[plugins]]
//! kind = "wasm"
//! path = "allowlist.wasm"                       # a component of the `relay-hook` world
//! fail_open = true                              # when the hook fails: allow (true) or deny
//! memory_mib = 16
//! fuel_per_call = 10000000                      # CPU budget of one call
//! deadline_ms = 250                             # wall-clock bound of one call, sleeps included
//! instances = 4                                 # calls served at the same time
//! ```
//!
//! A hook call never holds up more than its own caller: each call runs in one of the hook's
//! `instances` and is stopped at its deadline (the failure then gets the hook's fail-open or
//! fail-closed answer), and a caller that finds every instance busy waits at most one deadline
//! before getting that same answer. A hook that is failing or disabled shows in `/healthz`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use syncra_core::registry::PluginRegistry;

/// The longest delay a hook may impose on one envelope or session.
pub const MAX_HOOK_DELAY: Duration = Duration::from_secs(5);

/// A hook's answer, independent of the plugin technology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Go on.
    Allow,
    /// Refuse, with a reason the sender sees.
    Deny(String),
    /// Hold, then go on.
    Delay(Duration),
}

/// A hook's state in `/healthz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HookStatus {
    /// The last call of every kind succeeded.
    Ok,
    /// Its last call of some kind failed; it was restarted and is still asked.
    Failing,
    /// It failed `max_failures` times in a row in one kind of call: every call gets its
    /// fail-open or fail-closed answer until the relay restarts.
    Disabled,
}

/// How a hook is doing, as `/healthz` reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HookHealth {
    /// The hook's name.
    pub name: String,
    /// Its state.
    pub status: HookStatus,
    /// The longest current run of failures of one call kind.
    pub failures: u32,
    /// The last failure, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Calls being served right now.
    pub busy: u32,
}

impl HookHealth {
    /// A hook with nothing to report.
    pub fn ok(name: &str) -> HookHealth {
        HookHealth {
            name: name.to_owned(),
            status: HookStatus::Ok,
            failures: 0,
            detail: None,
            busy: 0,
        }
    }

    /// Whether the hook is disabled.
    pub fn is_disabled(&self) -> bool {
        self.status == HookStatus::Disabled
    }
}

/// What the relay asks a hook. Implemented by WASM hooks; kept as a trait so the session code
/// does not depend on the plugin technology.
pub trait RelayHook: Send + Sync {
    /// The hook's name, for logs.
    fn name(&self) -> &str;
    /// How it is doing.
    fn health(&self) -> HookHealth {
        HookHealth::ok(self.name())
    }
    /// A session authenticated.
    fn on_connect(&self, user: &syncra_core::UserId, client_ip: std::net::IpAddr) -> Verdict;
    /// An envelope is about to be routed.
    fn on_envelope(
        &self,
        session_user: &syncra_core::UserId,
        recipients: &[syncra_core::UserId],
        size: usize,
    ) -> Verdict;
}

/// Combines several hooks: the first deny wins; delays add up (bounded).
pub fn decide(verdicts: impl Iterator<Item = Verdict>) -> Verdict {
    let mut delay = Duration::ZERO;
    for v in verdicts {
        match v {
            Verdict::Allow => {}
            Verdict::Deny(why) => return Verdict::Deny(why),
            Verdict::Delay(d) => delay += d,
        }
    }
    if delay.is_zero() {
        Verdict::Allow
    } else {
        Verdict::Delay(delay.min(MAX_HOOK_DELAY))
    }
}

/// Asks every hook, off the async runtime's threads: a hook call may use its whole fuel budget
/// or wait up to its deadline, and the WASM host blocks its thread for the call. Each call has
/// its own blocking thread and its own hook instance, so one slow call holds up only its own
/// session.
/// What every hook point does with the hooks' verdict: goes on at once without hooks; waits out
/// a delay; turns a refusal into `Err` with the reason the client is told.
pub async fn admit(
    hooks: &[Arc<dyn RelayHook>],
    f: impl Fn(&dyn RelayHook) -> Verdict + Send + 'static,
) -> Result<(), String> {
    if hooks.is_empty() {
        return Ok(());
    }
    match ask(hooks, f).await {
        Verdict::Allow => Ok(()),
        Verdict::Delay(d) => {
            tokio::time::sleep(d).await;
            Ok(())
        }
        Verdict::Deny(why) => Err(why),
    }
}

/// The hooks' combined verdict (see `decide`), computed on a blocking thread.
pub async fn ask(
    hooks: &[Arc<dyn RelayHook>],
    f: impl Fn(&dyn RelayHook) -> Verdict + Send + 'static,
) -> Verdict {
    let hooks = hooks.to_vec();
    match tokio::task::spawn_blocking(move || decide(hooks.iter().map(|h| f(h.as_ref())))).await {
        Ok(v) => v,
        // A panic in our own glue or a native hook (guest failures are verdicts already):
        // refused, since which hook failed, and whether it was to fail open, is not known here,
        // and a policy must not be bypassed by making its call fail.
        Err(e) => {
            tracing::error!("a relay hook call panicked: {e}; refusing");
            Verdict::Deny("a relay policy check failed; try again later".into())
        }
    }
}

#[derive(serde::Deserialize)]
struct Entry {
    kind: String,
    path: std::path::PathBuf,
}

/// Refuses two entries naming one `kv_file`: each hook writes its whole store to its file, so
/// two would drop each other's keys, and their writes at once could leave a file neither
/// wrote. Paths are compared as written, relative ones from the config's directory.
fn one_store_per_file(entries: &[serde_json::Value], base: Option<&Path>) -> anyhow::Result<()> {
    let mut stores: std::collections::HashMap<std::path::PathBuf, usize> = Default::default();
    for (i, entry) in entries.iter().enumerate() {
        let Some(file) = entry.get("kv_file").and_then(serde_json::Value::as_str) else {
            continue;
        };
        let file = match base {
            Some(dir) if Path::new(file).is_relative() => dir.join(file),
            _ => Path::new(file).to_path_buf(),
        };
        let file: std::path::PathBuf = file
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .collect();
        if let Some(first) = stores.get(&file) {
            bail!(
                "[[plugins]] entries {} and {} both keep their store in kv_file {}: give each \
                 hook a file of its own",
                first + 1,
                i + 1,
                file.display()
            );
        }
        stores.insert(file, i);
    }
    Ok(())
}

/// Loads every `[[plugins]]` entry: native brokers go into the registry, hooks are returned.
pub fn load(
    entries: &[serde_json::Value],
    base: Option<&Path>,
    registry: &mut PluginRegistry,
) -> anyhow::Result<Vec<Arc<dyn RelayHook>>> {
    // Without the plugin features nothing is added or read; keep those builds warning-free.
    #[cfg_attr(not(feature = "plugins-wasm"), allow(unused_mut))]
    let mut hooks: Vec<Arc<dyn RelayHook>> = Vec::new();
    let _ = (&registry, base);
    one_store_per_file(entries, base)?;
    for (i, entry) in entries.iter().enumerate() {
        let head: Entry = serde_json::from_value(entry.clone()).with_context(|| {
            format!(
                "[[plugins]] entry {}: needs `kind` (\"native\" or \"wasm\") and `path`",
                i + 1
            )
        })?;
        let path = match base {
            Some(dir) if head.path.is_relative() => dir.join(&head.path),
            _ => head.path.clone(),
        };
        let _ = &path; // Unused in a build with neither plugin feature.
        match head.kind.as_str() {
            #[cfg(feature = "plugins-native")]
            "native" => {
                if let Some(extra) = entry
                    .as_object()
                    .and_then(|m| m.keys().find(|k| *k != "kind" && *k != "path"))
                {
                    bail!(
                        "[[plugins]] entry {} (native): unknown key `{extra}`",
                        i + 1
                    );
                }
                let plugin = syncra_plugin_sdk::host::load_broker_plugin(&path)
                    .with_context(|| format!("loading native plugin {}", path.display()))?;
                let name = plugin.name();
                syncra_plugin_sdk::host::register_native(&mut registry.brokers, plugin)?;
                tracing::info!(plugin = name, path = %path.display(), "loaded native broker plugin");
            }
            #[cfg(feature = "plugins-wasm")]
            "wasm" => hooks.push(wasm::load(entry, &path, i, base)?),
            #[cfg(not(feature = "plugins-native"))]
            "native" => bail!(
                "[[plugins]] entry {}: native plugins are not compiled into this build; rebuild \
                 with the plugins-native feature",
                i + 1
            ),
            #[cfg(not(feature = "plugins-wasm"))]
            "wasm" => bail!(
                "[[plugins]] entry {}: wasm plugins are not compiled into this build; rebuild \
                 with the plugins-wasm feature",
                i + 1
            ),
            other => bail!(
                "[[plugins]] entry {}: unknown plugin kind {other:?}; use \"native\" or \"wasm\"",
                i + 1
            ),
        }
    }
    Ok(hooks)
}

#[cfg(feature = "plugins-wasm")]
mod wasm {
    use std::net::IpAddr;
    use std::path::Path;
    use std::sync::{Arc, OnceLock};
    use std::time::Duration;

    use anyhow::Context;
    use syncra_core::UserId;
    use syncra_plugin_wasm::{
        ConnectInfo, EnvelopeMeta, HookPlugin, Verdict as WasmVerdict, WasmHost, WasmPluginConfig,
    };

    use super::{RelayHook, Verdict};

    /// A relay hook's default budgets are small: it runs on every envelope. About 5 ms of CPU.
    const HOOK_FUEL: u64 = 10_000_000;
    /// The wall-clock bound of one hook call, sleeps and waits included.
    const HOOK_DEADLINE_MS: u64 = 250;
    /// Calls of one hook served at the same time.
    const HOOK_INSTANCES: u32 = 4;

    fn host() -> anyhow::Result<&'static WasmHost> {
        static HOST: OnceLock<WasmHost> = OnceLock::new();
        if let Some(h) = HOST.get() {
            return Ok(h);
        }
        let h = WasmHost::new().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(HOST.get_or_init(|| h))
    }

    struct WasmHook {
        plugin: HookPlugin,
        fail_open: bool,
    }

    impl WasmHook {
        fn convert(&self, v: Result<WasmVerdict, syncra_plugin_wasm::WasmError>) -> Verdict {
            match v {
                Ok(WasmVerdict::Allow) => Verdict::Allow,
                Ok(WasmVerdict::Deny(why)) => Verdict::Deny(why),
                Ok(WasmVerdict::Delay(ms)) => Verdict::Delay(Duration::from_millis(ms.into())),
                Err(e) => {
                    // The plugin logged and restarted (or was disabled) already.
                    tracing::debug!("hook {} failed: {e}", self.plugin.name());
                    if self.fail_open {
                        Verdict::Allow
                    } else {
                        Verdict::Deny(format!(
                            "the relay's policy hook {} is failing; try again later",
                            self.plugin.name()
                        ))
                    }
                }
            }
        }
    }

    impl RelayHook for WasmHook {
        fn name(&self) -> &str {
            self.plugin.name()
        }

        fn health(&self) -> super::HookHealth {
            let health = self.plugin.health();
            let status = if health.disabled {
                super::HookStatus::Disabled
            } else if health.failures > 0 {
                super::HookStatus::Failing
            } else {
                super::HookStatus::Ok
            };
            super::HookHealth {
                name: self.plugin.name().to_owned(),
                status,
                failures: health.failures,
                detail: health.last_error,
                busy: health.busy,
            }
        }

        fn on_connect(&self, user: &UserId, client_ip: IpAddr) -> Verdict {
            let info = ConnectInfo {
                user: user.to_string(),
                client_ip: client_ip.to_string(),
            };
            self.convert(self.plugin.on_connect(&info))
        }

        fn on_envelope(
            &self,
            session_user: &UserId,
            recipients: &[UserId],
            size: usize,
        ) -> Verdict {
            let meta = EnvelopeMeta {
                session_user: session_user.to_string(),
                recipients: recipients.iter().map(UserId::to_string).collect(),
                size: size.min(u32::MAX as usize) as u32,
                time_ms: syncra_core::now_ms(),
            };
            self.convert(self.plugin.on_envelope(&meta))
        }
    }

    pub(super) fn load(
        entry: &serde_json::Value,
        path: &Path,
        index: usize,
        config_dir: Option<&Path>,
    ) -> anyhow::Result<Arc<dyn RelayHook>> {
        let mut map = entry.as_object().cloned().unwrap_or_default();
        map.remove("kind");
        let fail_open = match map.remove("fail_open") {
            None => true,
            Some(serde_json::Value::Bool(b)) => b,
            Some(_) => anyhow::bail!(
                "[[plugins]] entry {}: fail_open must be true or false",
                index + 1
            ),
        };
        map.insert(
            "path".into(),
            serde_json::Value::String(path.to_string_lossy().into_owned()),
        );
        // Other paths in the entry are relative to the config file too, like `path`.
        let base = config_dir.map(Path::to_path_buf);
        let resolve = |v: &mut serde_json::Value| {
            if let (Some(base), Some(p)) = (&base, v.as_str())
                && Path::new(p).is_relative()
            {
                *v = serde_json::Value::String(base.join(p).to_string_lossy().into_owned());
            }
        };
        if let Some(kv) = map.get_mut("kv_file") {
            resolve(kv);
        }
        if let Some(dirs) = map
            .get_mut("grants")
            .and_then(|g| g.get_mut("dirs"))
            .and_then(|d| d.as_array_mut())
        {
            dirs.iter_mut().for_each(resolve);
        }
        map.entry("fuel_per_call")
            .or_insert(serde_json::json!(HOOK_FUEL));
        map.entry("deadline_ms")
            .or_insert(serde_json::json!(HOOK_DEADLINE_MS));
        map.entry("instances")
            .or_insert(serde_json::json!(HOOK_INSTANCES));
        let config: WasmPluginConfig = serde_json::from_value(serde_json::Value::Object(map))
            .with_context(|| format!("[[plugins]] entry {} (wasm)", index + 1))?;
        let plugin = HookPlugin::load(host()?, config).map_err(|e| anyhow::anyhow!("{e}"))?;
        tracing::info!(plugin = plugin.name(), fail_open, "loaded relay hook");
        Ok(Arc::new(WasmHook { plugin, fail_open }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two hooks with one store file are refused before anything loads, however the path
    /// is spelled; different files are fine.
    #[test]
    fn two_hooks_cannot_share_a_store_file() {
        let base = Path::new("/etc/syncra");
        let hook =
            |kv: &str| serde_json::json!({ "kind": "wasm", "path": "h.wasm", "kv_file": kv });
        let err = one_store_per_file(&[hook("a.kv"), hook("b.kv"), hook("./a.kv")], Some(base))
            .unwrap_err()
            .to_string();
        assert!(err.contains("entries 1 and 3"), "{err}");
        assert!(err.contains("/etc/syncra/a.kv"), "{err}");
        let err = one_store_per_file(&[hook("/etc/syncra/b.kv"), hook("b.kv")], Some(base))
            .unwrap_err()
            .to_string();
        assert!(err.contains("entries 1 and 2"), "{err}");
        assert!(one_store_per_file(&[hook("a.kv"), hook("b.kv")], Some(base)).is_ok());
        let mut registry = PluginRegistry::new(crate::kinds::KNOWN);
        let err = load(&[hook("x.kv"), hook("x.kv")], Some(base), &mut registry)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("both keep their store"), "{err}");
        assert!(err.ends_with("give each hook a file of its own"), "{err}");
    }

    /// A hook whose call panics (a bug in glue or a native hook): refused, never allowed.
    #[tokio::test]
    async fn a_hook_call_that_panics_is_a_refusal() {
        struct Panics;
        impl RelayHook for Panics {
            fn name(&self) -> &str {
                "panics"
            }
            fn on_connect(&self, _: &syncra_core::UserId, _: std::net::IpAddr) -> Verdict {
                panic!("a bug")
            }
            fn on_envelope(
                &self,
                _: &syncra_core::UserId,
                _: &[syncra_core::UserId],
                _: usize,
            ) -> Verdict {
                panic!("a bug")
            }
        }
        let hooks: Vec<Arc<dyn RelayHook>> = vec![Arc::new(Panics)];
        let user = syncra_core::UserId::from_bytes([1; syncra_core::id::USER_ID_LEN]);
        let verdict = ask(&hooks, move |h| h.on_envelope(&user, &[], 10)).await;
        assert!(matches!(verdict, Verdict::Deny(_)), "{verdict:?}");
    }

    #[test]
    fn first_deny_wins_and_delays_add_up_bounded() {
        assert_eq!(
            decide([Verdict::Allow, Verdict::Allow].into_iter()),
            Verdict::Allow
        );
        assert_eq!(
            decide(
                [
                    Verdict::Delay(Duration::from_secs(1)),
                    Verdict::Deny("no".into()),
                    Verdict::Deny("later".into())
                ]
                .into_iter()
            ),
            Verdict::Deny("no".into())
        );
        assert_eq!(
            decide(
                [
                    Verdict::Delay(Duration::from_secs(4)),
                    Verdict::Delay(Duration::from_secs(4))
                ]
                .into_iter()
            ),
            Verdict::Delay(MAX_HOOK_DELAY)
        );
    }

    #[test]
    fn unknown_plugin_kinds_and_bad_entries_are_clear_errors() {
        let mut registry = PluginRegistry::new(crate::kinds::KNOWN);
        let err = load(
            &[serde_json::json!({"kind": "python", "path": "x"})],
            None,
            &mut registry,
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("unknown plugin kind"), "{err}");
        let err = load(&[serde_json::json!({"path": "x"})], None, &mut registry)
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("needs `kind`"), "{err:#}");
    }
}

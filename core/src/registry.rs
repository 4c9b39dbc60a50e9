//! The plugin registry: a factory per `kind` name, each plugin with its own typed config.
//!
//! Hosts never `match` on plugin names. Each built-in plugin crate registers a factory; a
//! config section `{ kind = "nats", ... }` selects one and the rest of the section is
//! deserialized into that plugin's own config type, with unknown keys refused. A kind that no
//! Syncra build has ever had and a first-party kind this binary was built without are different
//! errors, because the fixes differ (fix the typo vs. rebuild with a feature).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::broker::{Broker, BrokerSink};
use crate::error::PluginError;
use crate::mailbox::{Mailbox, MailboxLimits};
use crate::store::IdentityStore;
use crate::transport::Transport;

/// A future returned by a factory.
pub type FactoryFuture<T> = Pin<Box<dyn Future<Output = Result<T, PluginError>> + Send>>;

type FactoryFn<T, C> = Box<dyn Fn(serde_json::Value, C) -> FactoryFuture<T> + Send + Sync>;

/// The first-party kinds of one category and the cargo feature that compiles each in.
#[derive(Clone, Copy, Debug)]
pub struct KnownKind {
    /// The kind name.
    pub kind: &'static str,
    /// The cargo feature of the host that adds it.
    pub feature: &'static str,
}

/// First-party broker kinds.
pub const KNOWN_BROKERS: &[KnownKind] = &[
    KnownKind {
        kind: "memory",
        feature: "broker-memory",
    },
    KnownKind {
        kind: "redis",
        feature: "broker-redis",
    },
    KnownKind {
        kind: "nats",
        feature: "broker-nats",
    },
];

/// First-party mailbox kinds, with the relay feature that compiles each in.
pub const KNOWN_MAILBOXES: &[KnownKind] = &[
    KnownKind {
        kind: "none",
        feature: "(always built in)",
    },
    KnownKind {
        kind: "sqlite",
        feature: "store-sqlite",
    },
    KnownKind {
        kind: "postgres",
        feature: "store-postgres",
    },
    KnownKind {
        kind: "redis",
        feature: "broker-redis",
    },
    KnownKind {
        kind: "nats",
        feature: "broker-nats",
    },
];

/// First-party identity store kinds.
pub const KNOWN_STORES: &[KnownKind] = &[
    KnownKind {
        kind: "sqlite",
        feature: "store-sqlite",
    },
    KnownKind {
        kind: "postgres",
        feature: "store-postgres",
    },
];

/// First-party transport kinds.
pub const KNOWN_TRANSPORTS: &[KnownKind] = &[KnownKind {
    kind: "ws",
    feature: "transport-ws",
}];

/// The factories of one category (brokers, stores, ...).
pub struct Kinds<T, C> {
    category: &'static str,
    known: &'static [KnownKind],
    factories: BTreeMap<String, FactoryFn<T, C>>,
}

impl<T, C> std::fmt::Debug for Kinds<T, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kinds")
            .field("category", &self.category)
            .field("kinds", &self.factories.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl<T, C> Kinds<T, C> {
    /// An empty category.
    pub fn new(category: &'static str, known: &'static [KnownKind]) -> Self {
        Kinds {
            category,
            known,
            factories: BTreeMap::new(),
        }
    }

    /// Registers a factory under a kind name.
    pub fn register<F, Fut>(&mut self, kind: &str, factory: F) -> Result<(), PluginError>
    where
        F: Fn(serde_json::Value, C) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, PluginError>> + Send + 'static,
    {
        if self.factories.contains_key(kind) {
            return Err(PluginError::Duplicate {
                category: self.category,
                kind: kind.to_owned(),
            });
        }
        self.factories.insert(
            kind.to_owned(),
            Box::new(move |config, ctx| Box::pin(factory(config, ctx))),
        );
        Ok(())
    }

    /// The registered kind names.
    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.factories.keys().map(String::as_str)
    }

    /// Whether a kind is registered.
    pub fn contains(&self, kind: &str) -> bool {
        self.factories.contains_key(kind)
    }

    /// Creates a plugin from a config section `{ kind = "...", ...rest }`.
    pub async fn create(&self, section: serde_json::Value, ctx: C) -> Result<T, PluginError> {
        let (kind, rest) = split_kind(self.category, section)?;
        self.create_kind(&kind, rest, ctx).await
    }

    /// Creates a plugin of a named kind from its own config.
    pub async fn create_kind(
        &self,
        kind: &str,
        config: serde_json::Value,
        ctx: C,
    ) -> Result<T, PluginError> {
        match self.factories.get(kind) {
            Some(factory) => factory(config, ctx).await,
            None => Err(self.missing(kind)),
        }
    }

    fn missing(&self, kind: &str) -> PluginError {
        match self.known.iter().find(|k| k.kind == kind) {
            Some(known) => PluginError::NotCompiled {
                category: self.category,
                kind: kind.to_owned(),
                feature: known.feature.to_owned(),
            },
            None => PluginError::UnknownKind {
                category: self.category,
                kind: kind.to_owned(),
                available: self.kinds().collect::<Vec<_>>().join(", "),
            },
        }
    }
}

fn split_kind(
    category: &'static str,
    section: serde_json::Value,
) -> Result<(String, serde_json::Value), PluginError> {
    let serde_json::Value::Object(mut map) = section else {
        return Err(PluginError::Config {
            category,
            kind: String::new(),
            message: "expected a table with a `kind` key".into(),
        });
    };
    let kind = match map.remove("kind") {
        Some(serde_json::Value::String(k)) => k,
        Some(_) => {
            return Err(PluginError::Config {
                category,
                kind: String::new(),
                message: "`kind` must be a string".into(),
            });
        }
        None => {
            return Err(PluginError::Config {
                category,
                kind: String::new(),
                message: "missing `kind`".into(),
            });
        }
    };
    Ok((kind, serde_json::Value::Object(map)))
}

/// Deserializes a plugin's own config, naming the offending key on error. Plugin config types
/// should use `#[serde(deny_unknown_fields)]` so a typo is an error, not a silent default.
pub fn typed_config<T: DeserializeOwned>(
    category: &'static str,
    kind: &str,
    config: serde_json::Value,
) -> Result<T, PluginError> {
    serde_json::from_value(config).map_err(|e| PluginError::Config {
        category,
        kind: kind.to_owned(),
        message: e.to_string(),
    })
}

/// Every category a host can load plugins for.
pub struct PluginRegistry {
    /// Brokers, created with the sink that receives their deliveries.
    pub brokers: Kinds<Arc<dyn Broker>, Arc<dyn BrokerSink>>,
    /// Identity stores.
    pub stores: Kinds<Arc<dyn IdentityStore>, ()>,
    /// Transports.
    pub transports: Kinds<Arc<dyn Transport>, ()>,
    /// Mailboxes, created with the relay's per-recipient bounds.
    pub mailboxes: Kinds<Arc<dyn Mailbox>, MailboxLimits>,
}

impl Default for PluginRegistry {
    fn default() -> Self {
        PluginRegistry {
            brokers: Kinds::new("broker", KNOWN_BROKERS),
            stores: Kinds::new("store", KNOWN_STORES),
            transports: Kinds::new("transport", KNOWN_TRANSPORTS),
            mailboxes: Kinds::new("mailbox", KNOWN_MAILBOXES),
        }
    }
}

impl std::fmt::Debug for PluginRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginRegistry")
            .field("brokers", &self.brokers)
            .field("stores", &self.stores)
            .field("transports", &self.transports)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct EchoConfig {
        word: String,
    }

    fn registry() -> Kinds<String, ()> {
        let mut k = Kinds::new("broker", KNOWN_BROKERS);
        k.register("echo", |config, ()| async move {
            let c: EchoConfig = typed_config("broker", "echo", config)?;
            Ok(c.word)
        })
        .unwrap();
        k
    }

    #[tokio::test]
    async fn creates_by_kind_with_typed_config() {
        let k = registry();
        let v = serde_json::json!({"kind": "echo", "word": "hi"});
        assert_eq!(k.create(v, ()).await.unwrap(), "hi");
    }

    #[tokio::test]
    async fn unknown_key_names_the_key() {
        let k = registry();
        let v = serde_json::json!({"kind": "echo", "word": "hi", "wrod": 1});
        let err = k.create(v, ()).await.unwrap_err().to_string();
        assert!(err.contains("wrod"), "{err}");
    }

    #[tokio::test]
    async fn unknown_and_not_compiled_are_different_errors() {
        let k = registry();
        let err = k
            .create(serde_json::json!({"kind": "natz"}), ())
            .await
            .unwrap_err();
        assert!(matches!(err, PluginError::UnknownKind { .. }), "{err}");
        assert!(err.to_string().contains("echo"));
        let err = k
            .create(serde_json::json!({"kind": "nats"}), ())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, PluginError::NotCompiled { feature, .. } if feature == "broker-nats"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn duplicate_registration_is_refused() {
        let mut k = registry();
        let err = k.register("echo", |_, ()| async { Ok(String::new()) });
        assert!(matches!(err, Err(PluginError::Duplicate { .. })));
    }

    #[tokio::test]
    async fn missing_kind_is_a_config_error() {
        let k = registry();
        let err = k.create(serde_json::json!({"word": "x"}), ()).await;
        assert!(matches!(err, Err(PluginError::Config { .. })));
    }
}

//! The first-party plugin kinds this relay can be built with, and the cargo feature of this
//! crate that compiles each in: what turns "unknown kind" into "rebuild with feature X".
//! (Host knowledge, so it lives here, not in core.)

use syncra_core::registry::{KnownKind, KnownKinds};

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

/// First-party mailbox kinds.
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

/// All of them, for [`syncra_core::registry::PluginRegistry::new`].
pub const KNOWN: KnownKinds = KnownKinds {
    brokers: KNOWN_BROKERS,
    stores: KNOWN_STORES,
    transports: KNOWN_TRANSPORTS,
    mailboxes: KNOWN_MAILBOXES,
};

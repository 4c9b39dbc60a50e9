-- The relay's half of MLS (docs/PROTOCOL.md §9): the KeyPackage directory and, per group, the
-- epoch and members the last accepted commit set.
-- One-time KeyPackages, claimed oldest first (seq) and deleted when claimed.
CREATE TABLE key_packages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id BLOB NOT NULL,
    package BLOB NOT NULL
);
CREATE INDEX key_packages_by_user ON key_packages (user_id, seq);
-- The last-resort KeyPackage of each user: handed out when the one-time ones run out, kept.
CREATE TABLE last_resort_key_packages (
    user_id BLOB PRIMARY KEY,
    package BLOB NOT NULL
);
-- Group id -> epoch and members (user ids back to back), for one accepted commit per epoch.
CREATE TABLE mls_groups (
    group_id BLOB PRIMARY KEY,
    epoch INTEGER NOT NULL,
    members BLOB NOT NULL,
    last_commit BLOB NOT NULL,
    updated_at INTEGER NOT NULL
);

-- The relay's half of MLS (docs/PROTOCOL.md §9): the KeyPackage directory and, per group, the
-- epoch and members the last accepted commit set.
-- One-time KeyPackages, claimed oldest first (seq) and deleted when claimed.
CREATE TABLE key_packages (
    seq     BIGSERIAL PRIMARY KEY,
    user_id BYTEA NOT NULL CHECK (octet_length(user_id) = 20),
    package BYTEA NOT NULL
);
CREATE INDEX key_packages_by_user ON key_packages (user_id, seq);
-- The last-resort KeyPackage of each user: handed out when the one-time ones run out, kept.
CREATE TABLE last_resort_key_packages (
    user_id BYTEA PRIMARY KEY CHECK (octet_length(user_id) = 20),
    package BYTEA NOT NULL
);
-- Group id -> epoch and members (user ids back to back), for one accepted commit per epoch.
CREATE TABLE mls_groups (
    group_id   BYTEA PRIMARY KEY CHECK (octet_length(group_id) = 16),
    epoch      BIGINT NOT NULL CHECK (epoch >= 0),
    members    BYTEA NOT NULL,
    last_commit BYTEA NOT NULL CHECK (octet_length(last_commit) = 16),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Identity records: public material only (handle, identity key, signed prekey).
--
-- STRICT makes SQLite enforce the column types and the CHECKs pin the fixed key sizes, so a bad
-- write fails here instead of surfacing later as a corrupt row. NOT NULL is spelled out on the
-- primary key because SQLite, for historical reasons, lets a non-integer primary key be NULL.
-- prekey_created_at holds the u64 seconds of the signed prekey bit-cast to a signed 64-bit
-- integer, so the whole u64 range round-trips; never order by it in SQL.
-- registered_at is seconds since the Unix epoch, for operators; nothing reads it back.
CREATE TABLE users (
    user_id           BLOB    NOT NULL PRIMARY KEY CHECK (length(user_id) = 20),
    handle            TEXT    NOT NULL UNIQUE,
    identity_key      BLOB    NOT NULL CHECK (length(identity_key) = 32),
    prekey_public     BLOB    NOT NULL CHECK (length(prekey_public) = 32),
    prekey_created_at INTEGER NOT NULL,
    prekey_signature  BLOB    NOT NULL CHECK (length(prekey_signature) = 64),
    registered_at     INTEGER NOT NULL
) STRICT;

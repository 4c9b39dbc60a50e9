-- The mailbox: sealed deliveries held for recipients with no live session, in their own
-- database file (their writes never wait on registrations, nor the other way round).
--
-- `mailbox` holds the entries; `id` increases per recipient in the order puts committed.
-- `mailbox_usage` keeps each recipient's entry count and byte total (so a quota check reads
-- one row, not every entry) and the next id. Usage rows are never deleted: ids must never be
-- reused for a recipient, or a late acknowledgement could delete an entry not yet delivered.
-- stored_at is milliseconds since the Unix epoch; entries older than the TTL are purged.
CREATE TABLE mailbox (
    recipient BLOB    NOT NULL CHECK (length(recipient) = 20),
    id        INTEGER NOT NULL CHECK (id > 0),
    stored_at INTEGER NOT NULL,
    delivery  BLOB    NOT NULL,
    PRIMARY KEY (recipient, id)
) STRICT, WITHOUT ROWID;

CREATE INDEX mailbox_by_age ON mailbox (stored_at);

CREATE TABLE mailbox_usage (
    recipient BLOB    NOT NULL PRIMARY KEY CHECK (length(recipient) = 20),
    entries   INTEGER NOT NULL CHECK (entries >= 0),
    bytes     INTEGER NOT NULL CHECK (bytes >= 0),
    next_id   INTEGER NOT NULL CHECK (next_id > 0)
) STRICT, WITHOUT ROWID;

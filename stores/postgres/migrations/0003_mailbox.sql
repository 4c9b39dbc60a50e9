-- The mailbox: sealed deliveries held for recipients with no live session (kind = "postgres"
-- under [mailbox]). `id` increases per recipient in commit order (the usage row is locked while
-- an entry is added); `mailbox_usage` keeps each recipient's count, byte total and next id, and
-- is never deleted, so ids are never reused. stored_at is milliseconds since the Unix epoch.
CREATE TABLE mailbox (
    recipient BYTEA  NOT NULL CHECK (octet_length(recipient) = 20),
    id        BIGINT NOT NULL CHECK (id > 0),
    stored_at BIGINT NOT NULL,
    delivery  BYTEA  NOT NULL,
    CONSTRAINT mailbox_pkey PRIMARY KEY (recipient, id)
);

CREATE INDEX mailbox_by_age ON mailbox (stored_at);

CREATE TABLE mailbox_usage (
    recipient BYTEA  NOT NULL CHECK (octet_length(recipient) = 20),
    entries   BIGINT NOT NULL CHECK (entries >= 0),
    bytes     BIGINT NOT NULL CHECK (bytes >= 0),
    next_id   BIGINT NOT NULL CHECK (next_id > 0),
    CONSTRAINT mailbox_usage_pkey PRIMARY KEY (recipient)
);

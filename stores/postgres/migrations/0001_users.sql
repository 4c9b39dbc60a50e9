-- Identity records: public material only (handle, identity key, signed prekey).
--
-- The CHECKs pin the fixed key sizes, so a bad write fails here instead of surfacing later as a
-- corrupt row. The two unique constraints are named because the store maps a violation of each
-- to its own error (users_pkey: the identity is already registered; users_handle_key: the
-- handle is taken); renaming them is a breaking change for the store's code.
-- prekey_created_at is the u64 seconds of the signed prekey. NUMERIC(20, 0) holds the whole u64
-- range exactly, stays readable for operators, and orders correctly in SQL, which the store
-- relies on to refuse an older prekey atomically (bigint would need a bit-cast that breaks
-- ordering).
-- registered_at is for operators; nothing reads it back.
CREATE TABLE users (
    user_id           BYTEA         NOT NULL CHECK (octet_length(user_id) = 20),
    handle            TEXT          NOT NULL,
    identity_key      BYTEA         NOT NULL CHECK (octet_length(identity_key) = 32),
    prekey_public     BYTEA         NOT NULL CHECK (octet_length(prekey_public) = 32),
    prekey_created_at NUMERIC(20, 0) NOT NULL
        CHECK (prekey_created_at BETWEEN 0 AND 18446744073709551615),
    prekey_signature  BYTEA         NOT NULL CHECK (octet_length(prekey_signature) = 64),
    registered_at     TIMESTAMPTZ   NOT NULL DEFAULT now(),
    CONSTRAINT users_pkey PRIMARY KEY (user_id),
    CONSTRAINT users_handle_key UNIQUE (handle)
);

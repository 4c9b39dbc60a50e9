-- The entries move from a WITHOUT ROWID table to an ordinary (rowid) table: the same columns,
-- the same key (recipient, id), the same ids.
--
-- Why: a WITHOUT ROWID table keeps whole rows in the B-tree of its key, ordered by recipient.
-- A sealed envelope is hundreds of bytes, so every put for another recipient dirtied (and now
-- and then split) a 4 KiB page of its own, which the WAL and then the checkpoint wrote out:
-- about fifteen page writes per stored message. An ordinary table appends rows in insertion
-- order to its last page, and the key is a separate index of small entries. Measured with
-- bench/examples/mailbox.rs (40 000 puts from 400 senders, WAL, synchronous FULL): 11 000-15 000
-- msg/s before, 43 000-46 000 after (docs/BENCHMARKS.md).
CREATE TABLE mailbox_entries (
    recipient BLOB    NOT NULL CHECK (length(recipient) = 20),
    id        INTEGER NOT NULL CHECK (id > 0),
    stored_at INTEGER NOT NULL,
    delivery  BLOB    NOT NULL,
    PRIMARY KEY (recipient, id)
) STRICT;

INSERT INTO mailbox_entries (recipient, id, stored_at, delivery)
    SELECT recipient, id, stored_at, delivery FROM mailbox ORDER BY stored_at, recipient, id;

DROP TABLE mailbox;
ALTER TABLE mailbox_entries RENAME TO mailbox;
CREATE INDEX mailbox_by_age ON mailbox (stored_at);

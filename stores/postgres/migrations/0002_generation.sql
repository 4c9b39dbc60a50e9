-- A user's registration generation: a random number chosen when the row is inserted. Resume
-- tokens name it, so deleting a user (and registering the same identity again) revokes every
-- token issued before. Rows from before this migration have generation 0 until re-registered.
ALTER TABLE users ADD COLUMN generation BIGINT NOT NULL DEFAULT 0;

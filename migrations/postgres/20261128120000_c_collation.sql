-- Ids, queue names and states compare byte by byte ("C"), as in SQLite. With a
-- cluster's default libc locale (even C.UTF-8 on Postgres 15) every index
-- comparison went through strcoll, about a sixth of Postgres's CPU in a burst.
-- Ids are lowercase hex UUIDv7s, so their order does not change.
ALTER TABLE tasks
    ALTER COLUMN id TYPE TEXT COLLATE "C",
    ALTER COLUMN queue TYPE TEXT COLLATE "C",
    ALTER COLUMN state TYPE TEXT COLLATE "C",
    ALTER COLUMN schedule_id TYPE TEXT COLLATE "C",
    ALTER COLUMN idempotency_key TYPE TEXT COLLATE "C";
ALTER TABLE task_runs
    ALTER COLUMN task_id TYPE TEXT COLLATE "C";
ALTER TABLE task_events
    ALTER COLUMN task_id TYPE TEXT COLLATE "C",
    ALTER COLUMN schedule_id TYPE TEXT COLLATE "C",
    ALTER COLUMN queue TYPE TEXT COLLATE "C",
    ALTER COLUMN state TYPE TEXT COLLATE "C";

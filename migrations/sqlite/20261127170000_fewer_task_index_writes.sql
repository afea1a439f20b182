-- Fewer index entries to write per task. A task used to be written into six
-- b-trees when booked, and each state change moved it in two state indexes.
-- Now:
-- - the idempotency key and the schedule id index only rows that have one
--   (most tasks have neither);
-- - the state index holds only the rare states a person lists across every
--   queue (dead, retrying, cancelled, expired, skipped), so the hot path
--   scheduled -> dispatched -> running -> succeeded never touches it;
-- - a (queue, id) index lists a queue newest first without sorting it whole;
--   it is written once per task, as a queue never changes.
-- SQLite cannot drop a column's UNIQUE constraint, so the table is rebuilt.
CREATE TABLE tasks_rebuilt (
    id              TEXT PRIMARY KEY,
    queue           TEXT NOT NULL,
    state           TEXT NOT NULL,
    version         BIGINT NOT NULL,
    due_at_ms       BIGINT NOT NULL,
    bucket_ms       BIGINT NOT NULL,
    expire_at_ms    BIGINT,
    max_attempts    BIGINT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    idempotency_key TEXT,
    content_hash    TEXT NOT NULL,
    content_type    TEXT NOT NULL,
    payload_size    BIGINT NOT NULL,
    last_error      TEXT,
    created_at_ms   BIGINT NOT NULL,
    updated_at_ms   BIGINT NOT NULL,
    schedule_id     TEXT,
    fire_at_ms      BIGINT
);

INSERT INTO tasks_rebuilt (id, queue, state, version, due_at_ms, bucket_ms, expire_at_ms,
    max_attempts, attempts, idempotency_key, content_hash, content_type, payload_size,
    last_error, created_at_ms, updated_at_ms, schedule_id, fire_at_ms)
SELECT id, queue, state, version, due_at_ms, bucket_ms, expire_at_ms,
    max_attempts, attempts, idempotency_key, content_hash, content_type, payload_size,
    last_error, created_at_ms, updated_at_ms, schedule_id, fire_at_ms
FROM tasks;

DROP TABLE tasks;
ALTER TABLE tasks_rebuilt RENAME TO tasks;

CREATE UNIQUE INDEX tasks_idempotency_key ON tasks (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX tasks_queue_state_id ON tasks (queue, state, id);
CREATE INDEX tasks_queue_id ON tasks (queue, id);
CREATE INDEX tasks_rare_state_id ON tasks (state, id)
    WHERE state IN ('retrying', 'dead', 'cancelled', 'expired', 'skipped');
CREATE INDEX tasks_schedule_id ON tasks (schedule_id, id)
    WHERE schedule_id IS NOT NULL;

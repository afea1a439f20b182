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
ALTER TABLE tasks DROP CONSTRAINT tasks_idempotency_key_key;
CREATE UNIQUE INDEX tasks_idempotency_key ON tasks (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
DROP INDEX tasks_state_id;
CREATE INDEX tasks_rare_state_id ON tasks (state, id)
    WHERE state IN ('retrying', 'dead', 'cancelled', 'expired', 'skipped');
CREATE INDEX tasks_queue_id ON tasks (queue, id);
DROP INDEX tasks_schedule_id;
CREATE INDEX tasks_schedule_id ON tasks (schedule_id, id)
    WHERE schedule_id IS NOT NULL;

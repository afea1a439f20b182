-- Recurring schedules: the definition, and next_fire_at_ms, which replicas
-- advance with compare-and-set as they turn fire times into tasks.
CREATE TABLE schedules (
    id                TEXT PRIMARY KEY,
    queue             TEXT NOT NULL,
    payload           BLOB NOT NULL,
    content_type      TEXT NOT NULL,
    headers           TEXT NOT NULL,
    spec              TEXT NOT NULL,
    time_zone         TEXT NOT NULL,
    missing_day       TEXT NOT NULL,
    start_at_ms       BIGINT NOT NULL,
    end_at_ms         BIGINT,
    max_occurrences   BIGINT NOT NULL,
    jitter_ms         BIGINT NOT NULL,
    catch_up          TEXT NOT NULL,
    catch_up_limit    BIGINT NOT NULL,
    expire_after_ms   BIGINT,
    max_attempts      BIGINT NOT NULL,
    idempotency_key   TEXT UNIQUE,
    content_hash      TEXT NOT NULL,
    paused            INTEGER NOT NULL DEFAULT 0,
    occurrences       BIGINT NOT NULL DEFAULT 0,
    next_fire_at_ms   BIGINT,
    created_at_ms     BIGINT NOT NULL,
    updated_at_ms     BIGINT NOT NULL
);

CREATE INDEX schedules_due ON schedules (paused, next_fire_at_ms);
CREATE INDEX schedules_queue_id ON schedules (queue, id);

-- Occurrences are ordinary tasks that remember their schedule and fire time.
ALTER TABLE tasks ADD COLUMN schedule_id TEXT;
ALTER TABLE tasks ADD COLUMN fire_at_ms BIGINT;
CREATE INDEX tasks_schedule_id ON tasks (schedule_id, id);

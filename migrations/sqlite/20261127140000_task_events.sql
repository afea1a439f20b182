-- The event log behind Subscribe: one row per state change of a task. The id
-- is the cursor. Writers append in commit order (SQLite has one writer at a
-- time), so a reader that has seen id N has seen every event up to N.
CREATE TABLE task_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id     TEXT NOT NULL,
    schedule_id TEXT,
    queue       TEXT NOT NULL,
    attempt     BIGINT NOT NULL,
    state       TEXT NOT NULL,
    at_ms       BIGINT NOT NULL,
    worker_id   TEXT NOT NULL,
    error       TEXT
);

CREATE INDEX task_events_task ON task_events (task_id, id);
CREATE INDEX task_events_schedule ON task_events (schedule_id, id) WHERE schedule_id IS NOT NULL;

-- Events up to pruned_through were deleted after KAIROS_EVENT_RETENTION;
-- a cursor before it cannot be resumed without a gap.
CREATE TABLE event_horizon (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    pruned_through BIGINT NOT NULL
);
INSERT INTO event_horizon (id, pruned_through) VALUES (1, 0);

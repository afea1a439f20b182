-- Task index (status per task) and the run log (one row per attempt).
-- Times are milliseconds since the Unix epoch, the same in both backends.
CREATE TABLE tasks (
    id              TEXT PRIMARY KEY,
    queue           TEXT NOT NULL,
    state           TEXT NOT NULL,
    version         BIGINT NOT NULL,
    due_at_ms       BIGINT NOT NULL,
    bucket_ms       BIGINT NOT NULL,
    expire_at_ms    BIGINT,
    max_attempts    BIGINT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    idempotency_key TEXT UNIQUE,
    content_hash    TEXT NOT NULL,
    content_type    TEXT NOT NULL,
    payload_size    BIGINT NOT NULL,
    last_error      TEXT,
    created_at_ms   BIGINT NOT NULL,
    updated_at_ms   BIGINT NOT NULL
);

CREATE INDEX tasks_queue_state_id ON tasks (queue, state, id);
CREATE INDEX tasks_state_id ON tasks (state, id);

CREATE TABLE task_runs (
    task_id        TEXT NOT NULL,
    attempt        BIGINT NOT NULL,
    worker_id      TEXT NOT NULL,
    started_at_ms  BIGINT NOT NULL,
    finished_at_ms BIGINT,
    outcome        TEXT,
    error          TEXT,
    PRIMARY KEY (task_id, attempt)
);

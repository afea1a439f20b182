-- Queues: settings enforced by each queue's JetStream consumer (global
-- concurrency = max_ack_pending, run timeout = ack_wait, pause) and by its
-- workers (backoff, read from the consumer's metadata), and the rate limit
-- by the start claim (GCRA in Redis).
CREATE TABLE queues (
    name               TEXT PRIMARY KEY,
    max_concurrency    BIGINT NOT NULL,
    max_attempts       BIGINT NOT NULL,
    initial_backoff_ms BIGINT NOT NULL,
    max_backoff_ms     BIGINT NOT NULL,
    backoff_multiplier DOUBLE PRECISION NOT NULL,
    backoff_jitter     DOUBLE PRECISION NOT NULL,
    run_timeout_ms     BIGINT NOT NULL,
    expire_after_ms    BIGINT,
    rate_per_s         DOUBLE PRECISION NOT NULL DEFAULT 0,
    rate_burst         BIGINT NOT NULL DEFAULT 1,
    paused             BIGINT NOT NULL DEFAULT 0,
    created_at_ms      BIGINT NOT NULL,
    updated_at_ms      BIGINT NOT NULL
);

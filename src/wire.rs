//! The JetStream contract between Kairos servers and workers: names that both
//! sides must agree on. A worker in another language uses the same names.

/// Stream that keeps waiting tasks, one subject per time bucket.
pub const TASKS_STREAM: &str = "KAIROS_TASKS";
/// Subject prefix of waiting tasks: `kairos.tasks.<bucket_epoch_ms>`.
pub const TASKS_SUBJECT_PREFIX: &str = "kairos.tasks";
/// Work-queue stream of released tasks, one subject per queue.
pub const READY_STREAM: &str = "KAIROS_READY";
/// Subject prefix of released tasks: `kairos.ready.<queue>`, and
/// `kairos.ready.<queue>.ahead` (see [`ahead_subject`]).
pub const READY_SUBJECT_PREFIX: &str = "kairos.ready";
/// Header with the task's due instant in ms since the epoch, on waiting task
/// messages booked with `KAIROS_BOOKING_HEADERS` (else the envelope tells it).
/// The dispatcher reads it so that a far bucket can be pulled without bodies.
pub const DUE_HEADER: &str = "Kairos-Due-Ms";
/// Header with the task id on every released task message, and on waiting
/// ones booked with `KAIROS_BOOKING_HEADERS`.
pub const TASK_ID_HEADER: &str = "Kairos-Task-Id";
/// Header with the task's queue on waiting task messages booked with
/// `KAIROS_BOOKING_HEADERS`.
pub const QUEUE_HEADER: &str = "Kairos-Queue";
/// Header with the task's start deadline in ms since the epoch, when it has
/// one, on waiting task messages booked with `KAIROS_BOOKING_HEADERS`.
pub const EXPIRE_HEADER: &str = "Kairos-Expire-Ms";
/// Stream that keeps the envelope of each task that died, so RetryTask can
/// run it again; one subject per task: `kairos.dead.<task id>`.
pub const DEAD_STREAM: &str = "KAIROS_DEAD";
/// Subject prefix of dead letters.
pub const DEAD_SUBJECT_PREFIX: &str = "kairos.dead";
/// Header of released tasks with their bucket (ms), so a worker can report a
/// message whose body it cannot decode.
pub const BUCKET_HEADER: &str = "Kairos-Bucket-Ms";

/// Returns the subject of a task's dead letter.
pub fn dead_subject(task_id: &str) -> String {
    format!("{DEAD_SUBJECT_PREFIX}.{task_id}")
}

/// Core NATS subject (nothing stored) on which a replica says it committed
/// new task events; every replica with subscribers then reads them from SQL.
pub const EVENTS_SUBJECT: &str = "kairos.events";
/// Metadata of a Subscribe stream with the cursor to pass as `after_cursor`
/// to resume without a gap: in the headers, the cursor the stream starts
/// after; in the trailers of a stream that ended (ABORTED, UNAVAILABLE), the
/// last cursor delivered.
pub const RESUME_TRAILER: &str = "kairos-resume-after";
/// Pending limit of a queue consumer without a concurrency limit.
pub const UNLIMITED_ACK_PENDING: i64 = 100_000;
/// Consumer metadata keys through which the server hands a queue's retry
/// policy to its workers (milliseconds, and decimal numbers).
pub const RETRY_INITIAL_MS_KEY: &str = "kairos.retry.initial_ms";
/// See [`RETRY_INITIAL_MS_KEY`].
pub const RETRY_MAX_MS_KEY: &str = "kairos.retry.max_ms";
/// See [`RETRY_INITIAL_MS_KEY`].
pub const RETRY_MULTIPLIER_KEY: &str = "kairos.retry.multiplier";
/// See [`RETRY_INITIAL_MS_KEY`].
pub const RETRY_JITTER_KEY: &str = "kairos.retry.jitter";
/// Longest queue name; queue names become NATS subject tokens and consumer names.
pub const MAX_QUEUE_LEN: usize = 64;

/// Returns the subject that holds the tasks of one bucket.
pub fn bucket_subject(bucket_ms: i64) -> String {
    format!("{TASKS_SUBJECT_PREFIX}.{bucket_ms}")
}

/// Returns the subject that a queue's released tasks are published to.
pub fn ready_subject(queue: &str) -> String {
    format!("{READY_SUBJECT_PREFIX}.{queue}")
}

/// Returns the durable consumer name shared by every worker of a queue.
pub fn queue_consumer(queue: &str) -> String {
    format!("queue_{queue}")
}

/// Returns the subject of a queue's second lane: tasks released ahead of
/// their due time, which a worker holds without a run slot until then. The
/// queue's own subject carries what is due now (late bookings, retries), so
/// those never wait behind a burst that went ahead.
///
/// The server publishes here only while a worker pulls the lane (its
/// consumer has pulls waiting or messages pending); a worker that never
/// pulls it gets every task on the queue's own subject.
pub fn ahead_subject(queue: &str) -> String {
    format!("{READY_SUBJECT_PREFIX}.{queue}.ahead")
}

/// Returns the durable consumer name of a queue's ahead lane; the server
/// creates it for queues without a concurrency limit and removes it otherwise.
pub fn ahead_consumer(queue: &str) -> String {
    format!("ahead_{queue}")
}

/// Returns the durable consumer name of one bucket's dispatcher.
pub fn bucket_consumer(bucket_ms: i64) -> String {
    format!("bucket_{bucket_ms}")
}

/// Returns the message id of a task's release to its queue. Dispatching the
/// same task twice yields the same id, so JetStream drops the copy.
pub fn release_msg_id(task_id: &str) -> String {
    format!("{task_id}:release")
}

/// Tells whether `name` is a valid queue name: 1 to 64 of `[A-Za-z0-9_-]`.
pub fn is_valid_queue(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_QUEUE_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names_are_subject_tokens() {
        assert!(is_valid_queue("billing-renewals_2"));
        assert!(!is_valid_queue(""));
        assert!(!is_valid_queue("a.b"));
        assert!(!is_valid_queue("a*"));
        assert!(!is_valid_queue("a b"));
        assert!(!is_valid_queue(&"q".repeat(65)));
    }
}

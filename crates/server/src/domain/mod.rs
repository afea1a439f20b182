//! Pure domain types and rules: task ids, states, validation of new tasks,
//! bucket arithmetic. No I/O and no generated proto types here.

mod event;
mod queue;
mod recurrence;
mod schedule;
mod task;
mod validate;

pub use event::{EventFilter, MAX_SUBSCRIBED_TASKS, StartAt, Subscription, TaskEvent};
pub use queue::{
    MAX_CONCURRENCY, Queue, QueueSettings, QueueStats, QueueUpdate, RetryPolicy,
    validate_queue_name,
};
pub use recurrence::{MissingDay, Recurrence};
pub use schedule::{CatchUp, Overlap, RecurringSpec, Schedule, apply_update, validate_schedule};
pub use task::{
    AttemptOutcome, AttemptRecord, Backoff, NewTask, Occurrence, StatusWrite, TaskId, TaskRecord,
    TaskState, bucket_of, content_hash, version_of,
};
pub use validate::{Limits, ScheduleSpec, ValidationError, ValidationKind, validate};

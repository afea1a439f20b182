//! SQL storage of the task index and the run log, behind one trait with a
//! SQLite and a Postgres implementation (see [`sql`]).

pub mod claims;
mod queues;
mod schedules;
mod sql;

use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::domain::{
    AttemptRecord, EventFilter, NewTask, StatusWrite, TaskEvent, TaskId, TaskRecord, TaskState,
};

pub use queues::QueueStore;
pub use schedules::{ScheduleFilter, ScheduleInsert, ScheduleStore};
pub use sql::{PG_MIGRATOR, PgStore, SQLITE_MIGRATOR, SqliteStore, connect};

/// Errors of the SQL store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or failed the statement.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations could not be applied.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored row could not be read back into domain types.
    #[error("corrupt row in `{table}`: {reason}")]
    Corrupt {
        /// Table of the row.
        table: &'static str,
        /// What was wrong.
        reason: String,
    },
}

/// Result of a store operation.
pub type StoreResult<T> = Result<T, StoreError>;

/// What inserting one new task did.
#[derive(Debug, Clone, PartialEq)]
pub enum InsertOutcome {
    /// The task was stored.
    Inserted,
    /// Its idempotency key was already used with the same content: this is that task.
    Existing(TaskRecord),
    /// Its idempotency key was already used with other content.
    Conflict {
        /// The key.
        key: String,
    },
}

/// Filter and page of ListTasks.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this state.
    pub state: Option<TaskState>,
    /// Only ids below this one (the page token: newest first).
    pub before: Option<TaskId>,
    /// Only occurrences of this recurring schedule.
    pub schedule: Option<TaskId>,
    /// Page size.
    pub limit: u32,
}

/// The SQL task index and run log.
#[tonic::async_trait]
pub trait TaskStore: ScheduleStore + QueueStore + std::fmt::Debug + Send + Sync + 'static {
    /// Stores new tasks in state SCHEDULED, each in its own right: one
    /// transaction for all, one outcome per task in order.
    async fn insert_tasks(
        &self,
        tasks: &[NewTask],
        bucket_ms: &[i64],
    ) -> StoreResult<Vec<InsertOutcome>>;

    /// Removes tasks whose publish failed, so nothing half-written remains.
    async fn delete_tasks(&self, ids: &[TaskId]) -> StoreResult<()>;

    /// Returns one task.
    async fn get_task(&self, id: TaskId) -> StoreResult<Option<TaskRecord>>;

    /// Returns the run log of one task, oldest attempt first.
    async fn get_attempts(&self, id: TaskId) -> StoreResult<Vec<AttemptRecord>>;

    /// Returns one page of tasks, newest first.
    async fn list_tasks(&self, filter: &TaskFilter) -> StoreResult<Vec<TaskRecord>>;

    /// Applies status changes in one transaction and appends each to the
    /// event log; a change older than the stored state is ignored.
    async fn apply(&self, writes: &[StatusWrite]) -> StoreResult<()> {
        self.apply_in_turn(writes, None).await
    }

    /// `apply`, telling `rows_held` once the transaction holds its tasks'
    /// rows: a batch begun after that applies after this one wherever the
    /// two share a task, so the recorder may start it then.
    async fn apply_in_turn(
        &self,
        writes: &[StatusWrite],
        rows_held: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> StoreResult<()>;

    /// How many status batches are worth applying at once: 1 where there is
    /// a single writer (SQLite).
    fn batches_at_once(&self) -> usize;

    /// Moves a DEAD task back to DISPATCHED for a fresh set of attempts,
    /// allowing `max_attempts` in all from now on, and logs the change;
    /// false when the task is not DEAD.
    async fn revive_task(
        &self,
        id: TaskId,
        max_attempts: u32,
        at: DateTime<Utc>,
    ) -> StoreResult<bool>;

    /// Returns up to `limit` events that pass `filter` with a cursor in
    /// `(after, upto]`, oldest first.
    async fn read_events(
        &self,
        after: i64,
        upto: i64,
        filter: &EventFilter,
        limit: u32,
    ) -> StoreResult<Vec<TaskEvent>>;

    /// Returns the newest committed cursor: every event up to it is visible.
    async fn last_event(&self) -> StoreResult<i64>;

    /// Returns the cursor through which events were pruned (0 when none were).
    async fn pruned_through(&self) -> StoreResult<i64>;

    /// Deletes the oldest events, up to `max` of them, that happened before
    /// `before_ms`; returns how many went.
    async fn prune_events(&self, before_ms: i64, max: u32) -> StoreResult<u64>;
}

/// Shared handle to the configured store.
pub type DynStore = Arc<dyn TaskStore>;

pub(crate) fn ms_to_time(table: &'static str, ms: i64) -> StoreResult<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms).ok_or_else(|| StoreError::Corrupt {
        table,
        reason: format!("time {ms} out of range"),
    })
}

/// Reads a task (or schedule) id stored as text; a bad one means the row is corrupt.
pub(crate) fn id_from_text(table: &'static str, text: &str) -> StoreResult<crate::domain::TaskId> {
    text.parse().map_err(|e| StoreError::Corrupt {
        table,
        reason: format!("bad id `{text}`: {e}"),
    })
}

//! Use cases: they orchestrate the SQL store, the Redis claims and the bus,
//! and decide what each outcome means. No proto types here.

mod events;
mod inserter;
mod queues;
mod recorder;
mod recurring;
mod reports;
mod tasks;

use crate::bus::BusError;
use crate::domain::{TaskId, ValidationError};
use crate::store::StoreError;
use crate::store::claims::ClaimError;

pub use events::{EventService, EventSettings, EventStream, SubscribeEnd};
pub use inserter::Inserter;
pub use queues::{QueueDetail, QueueService};
pub use recorder::Recorder;
pub use recurring::{MAX_PREVIEW, PreviewQuery, RecurringService, SchedulePage};
pub use reports::{AttemptEnd, AttemptStart, ReportService, StartOutcome};
pub use tasks::{TaskDetail, TaskPage, TaskService};

/// Errors of the use cases, mapped to gRPC codes in `api/error.rs` only.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The request is malformed or too large.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// Nothing of this kind has this id or name.
    #[error("{what} `{id}` not found")]
    NotFound {
        /// What was looked for: task, schedule, queue.
        what: &'static str,
        /// The id or name asked for.
        id: String,
    },
    /// Something of this kind and name exists already.
    #[error("{what} `{name}` already exists")]
    Exists {
        /// What: queue.
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// The idempotency key was used with other content.
    #[error("idempotency key `{key}` was already used with different content")]
    AlreadyExists {
        /// The key.
        key: String,
    },
    /// The task's state forbids the operation.
    #[error("task `{id}` is {state}")]
    FailedPrecondition {
        /// The task.
        id: TaskId,
        /// Its current state, by name.
        state: String,
    },
    /// A backend is down; nothing was half-written.
    #[error("{backend} unavailable")]
    Unavailable {
        /// Which backend.
        backend: &'static str,
        /// The cause, for logs only.
        cause: String,
    },
    /// A position outside what is kept (an event cursor already pruned).
    #[error("{0}")]
    OutOfRange(String),
    /// A bug or corrupt data.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for AppError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Corrupt { .. } => Self::Internal(err.to_string()),
            other => Self::Unavailable {
                backend: "database",
                cause: format!("{other}: {other:?}"),
            },
        }
    }
}

impl From<ClaimError> for AppError {
    fn from(err: ClaimError) -> Self {
        match err {
            ClaimError::Unexpected(_) => Self::Internal(err.to_string()),
            ClaimError::Unavailable(cause) => Self::Unavailable {
                backend: "redis",
                cause: cause.to_string(),
            },
        }
    }
}

impl From<BusError> for AppError {
    fn from(err: BusError) -> Self {
        Self::Unavailable {
            backend: "nats",
            cause: err.to_string(),
        }
    }
}

/// Result of a use case.
pub type AppResult<T> = Result<T, AppError>;

/// Cuts a listing fetched with one row more than `limit` down to `limit`
/// and returns the id to continue after when that extra row was there.
fn page<T>(mut rows: Vec<T>, limit: u32, id: impl Fn(&T) -> TaskId) -> (Vec<T>, Option<TaskId>) {
    if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        let next = rows.last().map(id);
        (rows, next)
    } else {
        (rows, None)
    }
}

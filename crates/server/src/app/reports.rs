//! What happens when a worker asks to start an attempt or reports its end.

use chrono::{DateTime, Utc};
use tracing::instrument;

use super::{AppResult, Recorder};
use crate::domain::{StatusWrite, TaskId, TaskState};
use crate::store::DynStore;
use crate::store::claims::{Claims, FinishClaim, StartClaim};

/// A worker's request to start an attempt.
#[derive(Debug, Clone)]
pub struct AttemptStart {
    /// Task id as the worker read it from the envelope.
    pub task_id: String,
    /// Attempt number (the JetStream delivery count).
    pub attempt: u32,
    /// Bucket holding the claim.
    pub bucket_ms: i64,
    /// Start deadline, ms since epoch, 0 when none.
    pub expire_at_ms: i64,
    /// Worker identity.
    pub worker_id: String,
}

/// A worker's report of an attempt's end.
#[derive(Debug, Clone)]
pub struct AttemptEnd {
    /// Task id.
    pub task_id: String,
    /// Attempt number.
    pub attempt: u32,
    /// Bucket holding the claim.
    pub bucket_ms: i64,
    /// Succeeded, Retrying or Dead.
    pub state: TaskState,
    /// Error text for failures.
    pub error: Option<String>,
    /// When it ended.
    pub at: DateTime<Utc>,
    /// Worker identity.
    pub worker_id: String,
}

/// Whether a worker may run an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartOutcome {
    /// Run it.
    Run,
    /// Skip it, for this reason.
    Skip(String),
}

/// Decides starts and records results. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ReportService {
    store: DynStore,
    claims: Claims,
    recorder: Recorder,
    width_ms: i64,
}

impl ReportService {
    /// Creates the service over its backends.
    pub fn new(store: DynStore, claims: Claims, recorder: Recorder, width_ms: i64) -> Self {
        Self {
            store,
            claims,
            recorder,
            width_ms,
        }
    }

    /// Moves a task to RUNNING for one attempt, atomically against cancel,
    /// expiry and duplicate deliveries.
    #[instrument(skip_all, fields(task_id = %start.task_id, attempt = start.attempt))]
    pub async fn start(&self, start: AttemptStart) -> AppResult<StartOutcome> {
        let Ok(id) = start.task_id.parse::<TaskId>() else {
            return Ok(StartOutcome::Skip("malformed task id".into()));
        };
        let now = Utc::now();
        let claim = |force| {
            self.claims.start(
                start.bucket_ms,
                self.width_ms,
                &start.task_id,
                start.attempt,
                now.timestamp_millis(),
                start.expire_at_ms,
                force,
            )
        };
        let mut answer = claim(false).await?;
        if answer == StartClaim::Missing {
            // Redis lost the claim: SQL knows whether the task still may run.
            match self.store.get_task(id).await? {
                None => return Ok(StartOutcome::Skip("unknown task".into())),
                Some(task) if task.state.is_final() => {
                    return Ok(StartOutcome::Skip(format!("task is {}", task.state)));
                }
                Some(_) => answer = claim(true).await?,
            }
        }
        match answer {
            StartClaim::Run => {
                // The Redis claim decides the start; the RUNNING row is status
                // only, so the worker need not wait for its commit. The result
                // write, which must be durable, is awaited in `finish`.
                self.recorder
                    .record_soon(StatusWrite::Started {
                        id,
                        attempt: start.attempt,
                        worker_id: start.worker_id,
                        at: now,
                    })
                    .await;
                Ok(StartOutcome::Run)
            }
            StartClaim::Expired => {
                self.recorder
                    .record(StatusWrite::Closed {
                        id,
                        state: TaskState::Expired,
                        at: now,
                    })
                    .await?;
                Ok(StartOutcome::Skip("expired".into()))
            }
            StartClaim::Cancelled => Ok(StartOutcome::Skip("cancelled".into())),
            StartClaim::Duplicate(claim) => Ok(StartOutcome::Skip(format!("duplicate ({claim})"))),
            StartClaim::Missing => Ok(StartOutcome::Skip("claim missing".into())),
        }
    }

    /// Records how an attempt ended, in Redis (for races) and SQL (for status).
    #[instrument(skip_all, fields(task_id = %end.task_id, attempt = end.attempt))]
    pub async fn finish(&self, end: AttemptEnd) -> AppResult<()> {
        let Ok(id) = end.task_id.parse::<TaskId>() else {
            return Ok(());
        };
        let outcome = match end.state {
            TaskState::Succeeded => FinishClaim::Succeeded,
            TaskState::Retrying => FinishClaim::Retrying,
            _ => FinishClaim::Dead,
        };
        self.claims
            .finish(
                end.bucket_ms,
                self.width_ms,
                &end.task_id,
                end.attempt,
                outcome,
            )
            .await?;
        self.recorder
            .record(StatusWrite::Finished {
                id,
                attempt: end.attempt,
                worker_id: end.worker_id,
                state: end.state,
                error: end.error,
                at: end.at,
            })
            .await
    }
}

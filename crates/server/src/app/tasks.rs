//! Scheduling, cancelling and looking up one-off tasks.

use std::sync::Arc;

use chrono::Utc;
use tracing::{Instrument as _, instrument, warn};

use super::{AppError, AppResult, Inserter, QueueService, Recorder};
use crate::bus::Bus;
use crate::domain::{
    AttemptRecord, Limits, NewTask, ScheduleSpec, StatusWrite, TaskId, TaskRecord, TaskState,
    ValidationError, bucket_of, validate,
};
use crate::store::claims::{CancelClaim, Claims};
use crate::store::{DynStore, InsertOutcome, TaskFilter};

/// A task with its run log.
#[derive(Debug, Clone)]
pub struct TaskDetail {
    /// The task.
    pub task: TaskRecord,
    /// Every attempt, oldest first.
    pub attempts: Vec<AttemptRecord>,
}

/// One page of ListTasks.
#[derive(Debug, Clone)]
pub struct TaskPage {
    /// Tasks, newest first.
    pub tasks: Vec<TaskRecord>,
    /// Token of the next page, if any.
    pub next: Option<TaskId>,
}

/// The one-off task use cases. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: DynStore,
    claims: Claims,
    bus: Bus,
    recorder: Recorder,
    /// Each task's queue: created on first use, and the defaults for its attempts.
    queues: QueueService,
    /// Shares insert transactions between concurrent requests.
    inserter: Inserter,
    limits: Limits,
    /// Bucket width in ms: a task's bucket decides its subject and claim hash.
    width_ms: i64,
}

impl TaskService {
    /// Creates the service over its backends.
    pub fn new(
        store: DynStore,
        claims: Claims,
        bus: Bus,
        recorder: Recorder,
        queues: QueueService,
        limits: Limits,
        width_ms: i64,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                inserter: Inserter::spawn(store.clone(), bus.clone()),
                store,
                claims,
                bus,
                recorder,
                queues,
                limits,
                width_ms,
            }),
        }
    }

    /// Books one task; returns once it is durable in JetStream and visible in SQL.
    #[instrument(skip_all, fields(queue = %spec.queue))]
    pub async fn schedule(&self, spec: ScheduleSpec) -> AppResult<TaskRecord> {
        let mut results = self.schedule_batch(vec![Ok(spec)]).await?;
        results
            .pop()
            .unwrap_or_else(|| Err(AppError::Internal("empty batch result".into())))
    }

    /// Books many tasks, each stored or rejected on its own; one result per
    /// item, in order. Items that failed validation upstream come in as `Err`.
    ///
    /// The booking runs to its end even if the caller goes away (a client
    /// that gives up on its call): stopped part way, it would leave rows
    /// without their claims and messages, SCHEDULED for ever, or part of a
    /// fast batch stored.
    #[instrument(skip_all, fields(items = specs.len()))]
    pub async fn schedule_batch(
        &self,
        specs: Vec<Result<ScheduleSpec, ValidationError>>,
    ) -> AppResult<Vec<AppResult<TaskRecord>>> {
        let this = self.clone();
        to_the_end(async move { this.book(specs).await }).await
    }

    /// Books many tasks: see [`TaskService::schedule_batch`].
    async fn book(
        &self,
        specs: Vec<Result<ScheduleSpec, ValidationError>>,
    ) -> AppResult<Vec<AppResult<TaskRecord>>> {
        let inner = &self.inner;
        let now = Utc::now();
        let mut results: Vec<Option<AppResult<TaskRecord>>> = Vec::with_capacity(specs.len());
        let mut valid: Vec<(usize, NewTask)> = Vec::new();
        // Which tasks take their queue's attempts and start deadline.
        let mut defaulted: Vec<(bool, bool)> = Vec::new();
        for (i, spec) in specs.into_iter().enumerate() {
            let unset = spec
                .as_ref()
                .map(|s| (s.max_attempts.is_none(), s.expire_after_ms.is_none()))
                .unwrap_or_default();
            match spec.and_then(|s| validate(s, now, &inner.limits)) {
                Ok(task) => {
                    valid.push((i, task));
                    defaulted.push(unset);
                    results.push(None);
                }
                Err(err) => results.push(Some(Err(err.into()))),
            }
        }
        if valid.is_empty() {
            return Ok(results.into_iter().flatten().collect());
        }
        // After the fingerprint was taken, so a repeated request with the
        // same key still matches when the queue's settings changed since.
        let mut queues = std::collections::HashMap::new();
        for ((_, task), (attempts_unset, expiry_unset)) in valid.iter_mut().zip(defaulted) {
            if !queues.contains_key(&task.queue) {
                let queue = inner.queues.ensure(&task.queue).await?;
                queues.insert(task.queue.clone(), queue);
            }
            let settings = &queues[&task.queue].settings;
            if attempts_unset {
                task.max_attempts = settings.retry.max_attempts;
            }
            if expiry_unset {
                task.expire_at = settings
                    .expire_after_ms
                    .map(|ms| task.due_at + chrono::Duration::milliseconds(ms));
            }
        }
        // A past-due task goes into the current bucket, which is always open.
        let now_ms = now.timestamp_millis();
        let buckets: Vec<i64> = valid
            .iter()
            .map(|(_, t)| bucket_of(t.due_at.timestamp_millis().max(now_ms), inner.width_ms))
            .collect();
        // Claims first: the buckets are marked before the rows commit, and
        // the ids are timed by Redis after that, so each counts as scheduled
        // without a claim of its own (see `Claims::mark`). A Redis outage
        // stores nothing.
        let at_ms = inner.claims.mark(&buckets, inner.width_ms).await?;
        let (slots, tasks): (Vec<usize>, Vec<NewTask>) = valid
            .into_iter()
            .map(|(slot, mut task)| {
                task.id = TaskId::booked(at_ms);
                (slot, task)
            })
            .unzip();
        let inserted = inner.inserter.insert(tasks, buckets.clone()).await?;

        let mut fresh: Vec<(usize, i64, NewTask)> = Vec::new();
        for ((slot, bucket), (task, outcome)) in slots.into_iter().zip(buckets).zip(inserted) {
            match outcome {
                InsertOutcome::Inserted => fresh.push((slot, bucket, task)),
                InsertOutcome::Existing(record) => results[slot] = Some(Ok(record)),
                InsertOutcome::Conflict { key } => {
                    results[slot] = Some(Err(AppError::AlreadyExists { key }));
                }
            }
        }
        if !fresh.is_empty() {
            let to_publish: Vec<(i64, &NewTask)> = fresh.iter().map(|(_, b, t)| (*b, t)).collect();
            let published = inner.bus.publish_tasks(&to_publish).await;
            let mut failed = Vec::new();
            for ((slot, bucket, task), outcome) in fresh.into_iter().zip(published) {
                match outcome {
                    Ok(()) => results[slot] = Some(Ok(task.into_record(bucket))),
                    Err(err) => {
                        failed.push((bucket, task.id));
                        results[slot] = Some(Err(err.into()));
                    }
                }
            }
            if !failed.is_empty() {
                self.forget(&failed).await;
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(AppError::Internal("item without result".into()))))
            .collect())
    }

    /// Books one occurrence of a recurring schedule. Its idempotency key
    /// makes a repeat (another replica, or a retry after a crash between
    /// booking and advancing the schedule) find the same task; one still
    /// SCHEDULED is published again, which the JetStream duplicate window
    /// (message id = task id) and the Redis start claim make harmless.
    #[instrument(skip_all, fields(queue = %task.queue))]
    pub async fn materialize(
        &self,
        mut task: NewTask,
        skip_overlap: bool,
    ) -> AppResult<TaskRecord> {
        let inner = &self.inner;
        inner.queues.ensure(&task.queue).await?;
        let now_ms = Utc::now().timestamp_millis();
        let bucket = bucket_of(task.due_at.timestamp_millis().max(now_ms), inner.width_ms);
        let (copy, outcome) = inner
            .inserter
            .insert(vec![task.clone()], vec![bucket])
            .await?
            .pop()
            .ok_or_else(|| AppError::Internal("no insert outcome".into()))?;
        let (bucket, record, fresh) = match outcome {
            InsertOutcome::Inserted => (bucket, copy.into_record(bucket), true),
            InsertOutcome::Existing(record) if record.state == TaskState::Scheduled => {
                task.id = record.id;
                (record.bucket_ms, record, false)
            }
            InsertOutcome::Existing(record) => return Ok(record),
            InsertOutcome::Conflict { key } => return Err(AppError::AlreadyExists { key }),
        };
        let undo = |err: AppError| async move {
            if fresh {
                self.forget(&[(bucket, task.id)]).await;
            }
            Err(err)
        };
        let overlap_of = task
            .occurrence
            .filter(|_| skip_overlap)
            .map(|o| o.schedule_id);
        if let Err(err) = inner
            .claims
            .seed_occurrence(bucket, task.id, inner.width_ms, overlap_of)
            .await
        {
            return undo(err.into()).await;
        }
        match inner.bus.publish_tasks(&[(bucket, &task)]).await.pop() {
            Some(Ok(())) => Ok(record),
            Some(Err(err)) => undo(err.into()).await,
            None => undo(AppError::Internal("no publish outcome".into())).await,
        }
    }

    /// Undoes tasks whose publish failed or is in doubt: the claim is marked
    /// cancelled (so a copy JetStream did store never runs) and the row goes.
    async fn forget(&self, tasks: &[(i64, TaskId)]) {
        let inner = &self.inner;
        for (bucket, id) in tasks {
            if let Err(err) = inner.claims.cancel(*bucket, inner.width_ms, *id).await {
                warn!(%id, error = %err, "could not mark an unpublished task cancelled");
            }
        }
        let ids: Vec<TaskId> = tasks.iter().map(|(_, id)| *id).collect();
        match inner.store.delete_tasks(&ids).await {
            Ok(()) => inner.bus.signal_events().await,
            Err(err) => {
                warn!(count = ids.len(), error = %err, "could not delete unpublished tasks")
            }
        }
    }

    /// Cancels a task no worker has started; it will never run.
    #[instrument(skip_all, fields(%id))]
    pub async fn cancel(&self, id: TaskId) -> AppResult<TaskRecord> {
        let this = self.clone();
        to_the_end(async move { this.cancel_now(id).await }).await
    }

    /// Cancels a task: see [`TaskService::cancel`].
    async fn cancel_now(&self, id: TaskId) -> AppResult<TaskRecord> {
        let inner = &self.inner;
        let mut task = self.find(id).await?;
        match task.state {
            TaskState::Cancelled => return Ok(task),
            TaskState::Scheduled | TaskState::Dispatched | TaskState::Retrying => {}
            state => {
                return Err(AppError::FailedPrecondition {
                    id,
                    state: state.to_string(),
                });
            }
        }
        match inner
            .claims
            .cancel(task.bucket_ms, inner.width_ms, id)
            .await?
        {
            CancelClaim::Cancelled => {}
            CancelClaim::TooLate(claim) if claim == "C" => {}
            CancelClaim::TooLate(claim) => {
                return Err(AppError::FailedPrecondition {
                    id,
                    state: claim_state(&claim).to_string(),
                });
            }
        }
        let now = Utc::now();
        inner
            .recorder
            .record(StatusWrite::Closed {
                id,
                state: TaskState::Cancelled,
                at: now,
            })
            .await?;
        task.state = TaskState::Cancelled;
        task.updated_at = now;
        Ok(task)
    }

    /// Runs a DEAD task again with a fresh set of attempts (as many as it had
    /// at first), numbered after those it made; returns it DISPATCHED.
    #[instrument(skip_all, fields(%id))]
    pub async fn retry(&self, id: TaskId) -> AppResult<TaskRecord> {
        let this = self.clone();
        to_the_end(async move { this.retry_now(id).await }).await
    }

    /// Runs a DEAD task again: see [`TaskService::retry`].
    async fn retry_now(&self, id: TaskId) -> AppResult<TaskRecord> {
        let inner = &self.inner;
        let task = self.find(id).await?;
        if task.state != TaskState::Dead {
            return Err(AppError::FailedPrecondition {
                id,
                state: format!("{}, not dead", task.state),
            });
        }
        let Some(letter) = inner.bus.dead_letter(id).await? else {
            return Err(AppError::FailedPrecondition {
                id,
                state: "dead and its payload is no longer kept (KAIROS_DEAD_RETENTION)".into(),
            });
        };
        let (envelope, max_attempts) = Bus::retry_envelope(&letter, task.attempts)
            .map_err(|e| AppError::Internal(e.to_string()))?;
        let (bucket, width) = (task.bucket_ms, inner.width_ms);
        if !inner.claims.revive(bucket, width, id, true).await? {
            return Err(AppError::FailedPrecondition {
                id,
                state: "dead in SQL but not in its claim".into(),
            });
        }
        let now = Utc::now();
        if !inner.store.revive_task(id, max_attempts, now).await? {
            let _ = inner.claims.revive(bucket, width, id, false).await;
            return Err(AppError::FailedPrecondition {
                id,
                state: "no longer dead".into(),
            });
        }
        inner.bus.signal_events().await;
        if let Err(err) = inner
            .bus
            .release_retry(&task.queue, id, bucket, envelope, task.attempts)
            .await
        {
            // Put it back as it was: dead, with nothing released.
            if let Err(undo) = inner.claims.revive(bucket, width, id, false).await {
                warn!(%id, error = %undo, "could not put a dead task's claim back");
            }
            inner
                .recorder
                .record(StatusWrite::Closed {
                    id,
                    state: TaskState::Dead,
                    at: Utc::now(),
                })
                .await?;
            return Err(err.into());
        }
        self.find(id).await
    }

    /// Runs again the newest `limit` DEAD tasks of a queue whose last error
    /// contains `contains`; returns those re-run, and those that matched but
    /// could not be, with the reason.
    pub async fn retry_dead(
        &self,
        queue: &str,
        contains: Option<&str>,
        limit: u32,
    ) -> AppResult<(Vec<TaskRecord>, Vec<(TaskId, String)>)> {
        let dead = self
            .inner
            .store
            .list_tasks(&TaskFilter {
                queue: Some(queue.to_owned()),
                state: Some(TaskState::Dead),
                limit,
                ..TaskFilter::default()
            })
            .await?;
        let (mut retried, mut skipped) = (Vec::new(), Vec::new());
        for task in dead {
            let matches = contains.is_none_or(|text| {
                task.last_error
                    .as_deref()
                    .is_some_and(|error| error.contains(text))
            });
            if !matches {
                continue;
            }
            match self.retry(task.id).await {
                Ok(record) => retried.push(record),
                Err(err @ (AppError::FailedPrecondition { .. } | AppError::NotFound { .. })) => {
                    skipped.push((task.id, err.to_string()));
                }
                Err(err) => return Err(err),
            }
        }
        Ok((retried, skipped))
    }

    /// Returns a task with its run log.
    pub async fn get(&self, id: TaskId) -> AppResult<TaskDetail> {
        let task = self.find(id).await?;
        let attempts = self.inner.store.get_attempts(id).await?;
        Ok(TaskDetail { task, attempts })
    }

    /// Returns one page of tasks, newest first.
    pub async fn list(&self, mut filter: TaskFilter) -> AppResult<TaskPage> {
        let limit = filter.limit;
        // One extra row tells whether another page follows.
        filter.limit = limit + 1;
        let rows = self.inner.store.list_tasks(&filter).await?;
        let (tasks, next) = super::page(rows, limit, |t| t.id);
        Ok(TaskPage { tasks, next })
    }

    async fn find(&self, id: TaskId) -> AppResult<TaskRecord> {
        self.inner
            .store
            .get_task(id)
            .await?
            .ok_or_else(|| AppError::NotFound {
                what: "task",
                id: id.to_string(),
            })
    }
}

/// Names the state a claim value stands for.
/// Runs a use case that writes to several backends to its end, even if its
/// caller goes away (a client that gives up on its call drops the handler):
/// stopped between two writes, it would leave them disagreeing.
async fn to_the_end<T: Send + 'static>(
    work: impl std::future::Future<Output = AppResult<T>> + Send + 'static,
) -> AppResult<T> {
    tokio::spawn(work.in_current_span())
        .await
        .map_err(|err| AppError::Internal(format!("stopped part way: {err}")))?
}

fn claim_state(claim: &str) -> TaskState {
    match claim {
        "S" => TaskState::Scheduled,
        "D" => TaskState::Dispatched,
        "OK" => TaskState::Succeeded,
        "X" => TaskState::Dead,
        "C" => TaskState::Cancelled,
        "E" => TaskState::Expired,
        "K" => TaskState::Skipped,
        c if c.starts_with('Y') => TaskState::Retrying,
        _ => TaskState::Running,
    }
}

//! Recurring schedules: create, look up, pause, resume, delete, preview. The
//! materializer (`engine::materializer`) turns their fire times into tasks.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::instrument;

use super::{AppError, AppResult, TaskService};
use crate::domain::{
    Limits, MissingDay, Recurrence, RecurringSpec, Schedule, TaskId, TaskState, ValidationError,
    apply_update, validate_schedule,
};
use crate::store::{DynStore, ScheduleFilter, ScheduleInsert, TaskFilter};

/// Most fire times one preview returns.
pub const MAX_PREVIEW: u32 = 1000;

/// A preview request in domain terms.
#[derive(Debug, Clone)]
pub struct PreviewQuery {
    /// The spec as the user wrote it.
    pub spec: String,
    /// IANA zone name; empty for UTC.
    pub time_zone: String,
    /// Fire times strictly after this instant (intervals count from it).
    pub from: DateTime<Utc>,
    /// How many, 1 to [`MAX_PREVIEW`]; 0 means 10.
    pub count: u32,
    /// Policy for a day of month the month lacks.
    pub missing_day: MissingDay,
}

/// One page of schedules, newest first.
#[derive(Debug, Clone)]
pub struct SchedulePage {
    /// The schedules.
    pub schedules: Vec<Schedule>,
    /// Id to continue after, when another page follows.
    pub next: Option<TaskId>,
}

/// Recurring-schedule use cases. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RecurringService {
    store: DynStore,
    tasks: TaskService,
    limits: Limits,
    min_interval: Duration,
}

impl RecurringService {
    /// Creates the service; specs firing more often than `min_interval` are refused.
    pub fn new(
        store: DynStore,
        tasks: TaskService,
        limits: Limits,
        min_interval: Duration,
    ) -> Self {
        Self {
            store,
            tasks,
            limits,
            min_interval,
        }
    }

    /// Stores a new schedule; a repeated idempotency key with the same
    /// content returns the existing one.
    #[instrument(skip_all, fields(queue = %spec.queue))]
    pub async fn create(&self, spec: RecurringSpec) -> AppResult<Schedule> {
        let schedule = validate_schedule(spec, Utc::now(), &self.limits, self.min_interval)?;
        match self.store.insert_schedule(&schedule).await? {
            ScheduleInsert::Inserted => Ok(schedule),
            ScheduleInsert::Existing(existing) => Ok(*existing),
            ScheduleInsert::Conflict { key } => Err(AppError::AlreadyExists { key }),
        }
    }

    /// Returns a schedule.
    pub async fn get(&self, id: TaskId) -> AppResult<Schedule> {
        self.store
            .get_schedule(id)
            .await?
            .ok_or_else(|| AppError::NotFound {
                what: "schedule",
                id: id.to_string(),
            })
    }

    /// Returns one page of schedules, newest first.
    pub async fn list(&self, mut filter: ScheduleFilter) -> AppResult<SchedulePage> {
        let limit = filter.limit;
        // One extra row tells whether another page follows.
        filter.limit = limit + 1;
        let rows = self.store.list_schedules(&filter).await?;
        let (schedules, next) = super::page(rows, limit, |s| s.id);
        Ok(SchedulePage { schedules, next })
    }

    /// Changes the fields named in `mask`; the change takes effect from the
    /// next fire time not yet made into a task.
    #[instrument(skip_all, fields(%id))]
    pub async fn update(
        &self,
        id: TaskId,
        changes: RecurringSpec,
        mask: &[String],
    ) -> AppResult<Schedule> {
        // The materializer may move the schedule on meanwhile: read it again and retry.
        for _ in 0..5 {
            let current = self.get(id).await?;
            let updated = apply_update(
                &current,
                changes.clone(),
                mask,
                Utc::now(),
                &self.limits,
                self.min_interval,
            )?;
            if self
                .store
                .update_schedule(&updated, current.next_fire_at)
                .await?
            {
                return Ok(updated);
            }
        }
        Err(AppError::Unavailable {
            backend: "database",
            cause: "the schedule kept moving; retry".into(),
        })
    }

    /// Stops new occurrences; those already made stay (cancel them by id).
    pub async fn pause(&self, id: TaskId) -> AppResult<Schedule> {
        self.set_paused(id, true).await
    }

    /// Continues from now: fire times missed while paused follow the catch-up policy.
    pub async fn resume(&self, id: TaskId) -> AppResult<Schedule> {
        self.set_paused(id, false).await
    }

    async fn set_paused(&self, id: TaskId, paused: bool) -> AppResult<Schedule> {
        self.store
            .set_paused(id, paused, Utc::now())
            .await?
            .ok_or_else(|| AppError::NotFound {
                what: "schedule",
                id: id.to_string(),
            })
    }

    /// Deletes a schedule; with `cancel_pending`, also cancels its occurrences
    /// that no worker has started. Returns how many were cancelled.
    #[instrument(skip_all, fields(%id))]
    pub async fn delete(&self, id: TaskId, cancel_pending: bool) -> AppResult<u32> {
        if !self.store.delete_schedule(id).await? {
            return Err(AppError::NotFound {
                what: "schedule",
                id: id.to_string(),
            });
        }
        if !cancel_pending {
            return Ok(0);
        }
        let mut cancelled = 0;
        let mut before = None;
        loop {
            let page = self
                .tasks
                .list(TaskFilter {
                    schedule: Some(id),
                    before,
                    limit: 1000,
                    ..TaskFilter::default()
                })
                .await?;
            for task in &page.tasks {
                let pending = matches!(
                    task.state,
                    TaskState::Scheduled | TaskState::Dispatched | TaskState::Retrying
                );
                if pending {
                    match self.tasks.cancel(task.id).await {
                        Ok(_) => cancelled += 1,
                        // It started meanwhile: it runs to the end.
                        Err(AppError::FailedPrecondition { .. }) => {}
                        Err(err) => return Err(err),
                    }
                }
            }
            match page.next {
                Some(next) => before = Some(next),
                None => break,
            }
        }
        Ok(cancelled)
    }

    /// Returns when a spec would fire, after the same checks a new schedule gets.
    pub fn preview(&self, query: &PreviewQuery) -> AppResult<Vec<DateTime<Utc>>> {
        let count = match query.count {
            0 => 10,
            n if n > MAX_PREVIEW => {
                return Err(ValidationError::invalid(
                    "count",
                    format!("at most {MAX_PREVIEW}, got {n}"),
                )
                .into());
            }
            n => n,
        };
        let rule = Recurrence::parse(&query.spec, &query.time_zone, query.missing_day)?;
        rule.check(query.from, self.min_interval)?;
        Ok(rule.preview(query.from, query.from, count as usize))
    }
}

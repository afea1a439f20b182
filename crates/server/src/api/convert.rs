//! Conversions between proto types and domain types; the only place that
//! sees `prost_types::Timestamp` and `Duration`.

use chrono::{DateTime, Utc};
use kairos_proto::v1 as pb;

use crate::app::{
    AppError, AttemptEnd, AttemptStart, PreviewQuery, SchedulePage, TaskDetail, TaskPage,
};
use crate::domain::{
    AttemptOutcome, AttemptRecord, Backoff, CatchUp, EventFilter, MissingDay, Overlap,
    RecurringSpec, Schedule, ScheduleSpec, StartAt, Subscription, TaskEvent, TaskId, TaskRecord,
    TaskState, ValidationError,
};
use crate::store::{ScheduleFilter, TaskFilter};

/// Longest attempt detail kept, in characters.
const MAX_DETAIL: usize = 1024;

/// Largest page ListTasks returns.
pub(crate) const MAX_PAGE: u32 = 1000;
const DEFAULT_PAGE: u32 = 100;

pub(crate) fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    std::time::SystemTime::from(t).into()
}

fn from_timestamp(
    field: &str,
    t: &prost_types::Timestamp,
) -> Result<DateTime<Utc>, ValidationError> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(ValidationError::invalid(field, "nanos must be in 0..1e9"));
    }
    DateTime::from_timestamp(t.seconds, t.nanos as u32)
        .ok_or_else(|| ValidationError::invalid(field, "timestamp out of range"))
}

pub(crate) fn duration_ms(field: &str, d: &prost_types::Duration) -> Result<i64, ValidationError> {
    if d.nanos.abs() >= 1_000_000_000
        || (d.seconds > 0 && d.nanos < 0)
        || (d.seconds < 0 && d.nanos > 0)
    {
        return Err(ValidationError::invalid(field, "malformed duration"));
    }
    d.seconds
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add(i64::from(d.nanos / 1_000_000)))
        .ok_or_else(|| ValidationError::invalid(field, "duration out of range"))
}

impl TryFrom<pb::ScheduleRequest> for ScheduleSpec {
    type Error = ValidationError;

    fn try_from(req: pb::ScheduleRequest) -> Result<Self, Self::Error> {
        Ok(ScheduleSpec {
            queue: req.queue,
            payload: req.payload.into(),
            content_type: req.content_type,
            headers: req.headers.into_iter().collect(),
            run_at: req
                .run_at
                .as_ref()
                .map(|t| from_timestamp("run_at", t))
                .transpose()?,
            delay_ms: req
                .delay
                .as_ref()
                .map(|d| duration_ms("delay", d))
                .transpose()?,
            idempotency_key: req.idempotency_key,
            expire_after_ms: req
                .expire_after
                .as_ref()
                .map(|d| duration_ms("expire_after", d))
                .transpose()?,
            max_attempts: req.max_attempts,
            backoff: req
                .backoff
                .map(|b| -> Result<Backoff, ValidationError> {
                    Ok(Backoff {
                        initial_ms: b
                            .initial
                            .as_ref()
                            .map(|d| duration_ms("backoff.initial", d))
                            .transpose()?,
                        max_ms: b
                            .max
                            .as_ref()
                            .map(|d| duration_ms("backoff.max", d))
                            .transpose()?,
                        multiplier: b.multiplier,
                        jitter: b.jitter,
                    })
                })
                .transpose()?,
        })
    }
}

/// Parses a task id field, naming the field when it is empty or malformed.
pub(crate) fn task_id(field: &str, id: &str) -> Result<TaskId, AppError> {
    if id.is_empty() {
        return Err(ValidationError::invalid(field, "must not be empty").into());
    }
    id.parse()
        .map_err(|_| ValidationError::invalid(field, "is not a task id (a UUID)").into())
}

pub(crate) fn state_to_pb(state: TaskState) -> pb::TaskState {
    match state {
        TaskState::Scheduled => pb::TaskState::Scheduled,
        TaskState::Dispatched => pb::TaskState::Dispatched,
        TaskState::Running => pb::TaskState::Running,
        TaskState::Succeeded => pb::TaskState::Succeeded,
        TaskState::Retrying => pb::TaskState::Retrying,
        TaskState::Dead => pb::TaskState::Dead,
        TaskState::Cancelled => pb::TaskState::Cancelled,
        TaskState::Expired => pb::TaskState::Expired,
        TaskState::Skipped => pb::TaskState::Skipped,
    }
}

fn state_from_pb(value: i32) -> Result<Option<TaskState>, ValidationError> {
    Ok(match pb::TaskState::try_from(value) {
        Ok(pb::TaskState::Unspecified) => None,
        Ok(pb::TaskState::Scheduled) => Some(TaskState::Scheduled),
        Ok(pb::TaskState::Dispatched) => Some(TaskState::Dispatched),
        Ok(pb::TaskState::Running) => Some(TaskState::Running),
        Ok(pb::TaskState::Succeeded) => Some(TaskState::Succeeded),
        Ok(pb::TaskState::Retrying) => Some(TaskState::Retrying),
        Ok(pb::TaskState::Dead) => Some(TaskState::Dead),
        Ok(pb::TaskState::Cancelled) => Some(TaskState::Cancelled),
        Ok(pb::TaskState::Expired) => Some(TaskState::Expired),
        Ok(pb::TaskState::Skipped) => Some(TaskState::Skipped),
        Err(_) => return Err(ValidationError::invalid("state", "unknown task state")),
    })
}

impl From<TaskRecord> for pb::Task {
    fn from(t: TaskRecord) -> Self {
        pb::Task {
            id: t.id.to_string(),
            queue: t.queue,
            due_at: Some(timestamp(t.due_at)),
            state: state_to_pb(t.state).into(),
            attempts: t.attempts,
            max_attempts: t.max_attempts,
            created_at: Some(timestamp(t.created_at)),
            updated_at: Some(timestamp(t.updated_at)),
            expire_at: t.expire_at.map(timestamp),
            idempotency_key: t.idempotency_key.unwrap_or_default(),
            content_type: t.content_type,
            payload_size: u32::try_from(t.payload_size).unwrap_or(u32::MAX),
            last_error: t.last_error.unwrap_or_default(),
            schedule_id: t
                .occurrence
                .map(|o| o.schedule_id.to_string())
                .unwrap_or_default(),
            fire_at: t.occurrence.map(|o| timestamp(o.fire_at)),
        }
    }
}

impl From<AttemptRecord> for pb::TaskAttempt {
    fn from(a: AttemptRecord) -> Self {
        let outcome = match a.outcome {
            None => pb::AttemptOutcome::Unspecified,
            Some(AttemptOutcome::Succeeded) => pb::AttemptOutcome::Succeeded,
            Some(AttemptOutcome::Failed) => pb::AttemptOutcome::Failed,
            Some(AttemptOutcome::Terminal) => pb::AttemptOutcome::Terminal,
        };
        pb::TaskAttempt {
            attempt: a.attempt,
            worker_id: a.worker_id,
            started_at: Some(timestamp(a.started_at)),
            finished_at: a.finished_at.map(timestamp),
            outcome: outcome.into(),
            error: a.error.unwrap_or_default(),
            detail: a.detail.unwrap_or_default(),
        }
    }
}

impl From<TaskDetail> for pb::GetTaskResponse {
    fn from(d: TaskDetail) -> Self {
        pb::GetTaskResponse {
            task: Some(d.task.into()),
            attempts: d.attempts.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<TaskPage> for pb::ListTasksResponse {
    fn from(page: TaskPage) -> Self {
        pb::ListTasksResponse {
            tasks: page.tasks.into_iter().map(Into::into).collect(),
            next_page_token: page.next.map(|id| id.to_string()).unwrap_or_default(),
        }
    }
}

/// What every listing request carries, checked: queue filter, page token, page size.
struct Listing {
    queue: Option<String>,
    before: Option<TaskId>,
    limit: u32,
}

fn listing(queue: String, page_size: u32, page_token: &str) -> Result<Listing, AppError> {
    if !queue.is_empty() && !kairos_proto::wire::is_valid_queue(&queue) {
        return Err(ValidationError::invalid("queue", "is not a valid queue name").into());
    }
    if page_size > MAX_PAGE {
        return Err(
            ValidationError::invalid("page_size", format!("must be at most {MAX_PAGE}")).into(),
        );
    }
    let before = if page_token.is_empty() {
        None
    } else {
        Some(task_id("page_token", page_token)?)
    };
    Ok(Listing {
        queue: (!queue.is_empty()).then_some(queue),
        before,
        limit: if page_size == 0 {
            DEFAULT_PAGE
        } else {
            page_size
        },
    })
}

/// Converts a ListTasks request into a store filter.
pub(crate) fn task_filter(req: pb::ListTasksRequest) -> Result<TaskFilter, AppError> {
    let list = listing(req.queue, req.page_size, &req.page_token)?;
    let schedule = if req.schedule_id.is_empty() {
        None
    } else {
        Some(task_id("schedule_id", &req.schedule_id)?)
    };
    Ok(TaskFilter {
        queue: list.queue,
        state: state_from_pb(req.state)?,
        before: list.before,
        schedule,
        limit: list.limit,
    })
}

/// Which dead tasks of a queue a RetryTask asks for.
pub(crate) struct DeadFilter {
    pub(crate) queue: String,
    pub(crate) contains: Option<String>,
    pub(crate) limit: u32,
}

/// Checks the queue form of a RetryTask request.
pub(crate) fn dead_filter(req: &pb::RetryTaskRequest) -> Result<DeadFilter, AppError> {
    if req.queue.is_empty() {
        return Err(ValidationError::invalid(
            "id",
            "set id, or queue to re-run a queue's dead tasks",
        )
        .into());
    }
    if req.limit > MAX_PAGE {
        let reason = format!("must be at most {MAX_PAGE}");
        return Err(ValidationError::invalid("limit", reason).into());
    }
    let list = listing(req.queue.clone(), req.limit, "")?;
    Ok(DeadFilter {
        queue: list.queue.unwrap_or_default(),
        contains: (!req.error_contains.is_empty()).then(|| req.error_contains.clone()),
        limit: list.limit,
    })
}

/// Converts and checks a Subscribe request.
pub(crate) fn subscription(req: pb::SubscribeRequest) -> Result<Subscription, AppError> {
    // Counted before parsing, so an oversized list costs nothing.
    Subscription::check_task_count(req.task_ids.len())?;
    let task_ids = req
        .task_ids
        .iter()
        .enumerate()
        .map(|(i, id)| task_id(&format!("task_ids[{i}]"), id))
        .collect::<Result<Vec<_>, _>>()?;
    let schedule_id = if req.schedule_id.is_empty() {
        None
    } else {
        Some(task_id("schedule_id", &req.schedule_id)?)
    };
    let mut states = Vec::with_capacity(req.states.len());
    for (i, value) in req.states.iter().enumerate() {
        let field = format!("states[{i}]");
        match state_from_pb(*value) {
            Ok(Some(state)) => states.push(state),
            Ok(None) => {
                return Err(ValidationError::invalid(field, "must not be UNSPECIFIED").into());
            }
            Err(err) => return Err(ValidationError::invalid(field, err.reason).into()),
        }
    }
    let start = match (req.after_cursor, req.from_beginning) {
        (Some(_), true) => {
            return Err(ValidationError::invalid(
                "after_cursor",
                "set either after_cursor or from_beginning, not both",
            )
            .into());
        }
        (Some(cursor), false) => StartAt::After(i64::try_from(cursor).map_err(|_| {
            AppError::from(ValidationError::invalid("after_cursor", "out of range"))
        })?),
        (None, true) => StartAt::Beginning,
        (None, false) => StartAt::Now,
    };
    let filter = EventFilter {
        task_ids,
        schedule_id,
        queue: (!req.queue.is_empty()).then_some(req.queue),
        states,
    };
    Ok(Subscription::new(filter, start)?)
}

impl From<TaskEvent> for pb::TaskEvent {
    fn from(e: TaskEvent) -> Self {
        pb::TaskEvent {
            cursor: u64::try_from(e.cursor).unwrap_or(0),
            task_id: e.task_id.to_string(),
            schedule_id: e.schedule_id.map(|id| id.to_string()).unwrap_or_default(),
            queue: e.queue,
            attempt: e.attempt,
            state: state_to_pb(e.state).into(),
            time: Some(timestamp(e.at)),
            worker_id: e.worker_id,
            error: e.error.unwrap_or_default(),
        }
    }
}

/// Converts a worker's start message.
pub(crate) fn attempt_start(worker_id: String, s: pb::AttemptStarted) -> AttemptStart {
    AttemptStart {
        task_id: s.task_id,
        attempt: s.attempt,
        bucket_ms: s.bucket_ms,
        expire_at_ms: s.expire_at_ms,
        queue: s.queue,
        due_at_ms: s.due_at_ms,
        worker_id,
    }
}

/// Converts a worker's result message.
pub(crate) fn attempt_end(
    worker_id: String,
    f: pb::AttemptFinished,
) -> Result<AttemptEnd, ValidationError> {
    let state = match pb::AttemptResult::try_from(f.result) {
        Ok(pb::AttemptResult::Succeeded) => TaskState::Succeeded,
        Ok(pb::AttemptResult::Retrying) => TaskState::Retrying,
        Ok(pb::AttemptResult::Dead) => TaskState::Dead,
        _ => return Err(ValidationError::invalid("result", "unknown attempt result")),
    };
    let at = match &f.at {
        Some(t) => from_timestamp("at", t)?,
        None => Utc::now(),
    };
    Ok(AttemptEnd {
        task_id: f.task_id,
        attempt: f.attempt,
        bucket_ms: f.bucket_ms,
        state,
        error: (!f.error.is_empty()).then_some(f.error),
        // Bounded here too, whatever a worker in another language sends.
        detail: (!f.detail.is_empty()).then(|| f.detail.chars().take(MAX_DETAIL).collect()),
        at,
        worker_id,
    })
}

pub(crate) fn preview_query(
    req: pb::PreviewRecurringRequest,
) -> Result<PreviewQuery, ValidationError> {
    let from = match &req.from {
        Some(t) => from_timestamp("from", t)?,
        None => Utc::now(),
    };
    let missing_day = missing_day_from_pb(req.missing_day)?;
    Ok(PreviewQuery {
        spec: req.spec,
        time_zone: req.time_zone,
        from,
        count: req.count,
        missing_day,
    })
}

fn missing_day_from_pb(value: i32) -> Result<MissingDay, ValidationError> {
    match pb::MissingDayPolicy::try_from(value) {
        Ok(pb::MissingDayPolicy::Unspecified | pb::MissingDayPolicy::Skip) => Ok(MissingDay::Skip),
        Ok(pb::MissingDayPolicy::LastDay) => Ok(MissingDay::LastDay),
        Err(_) => Err(ValidationError::invalid(
            "missing_day",
            format!("unknown policy {value}"),
        )),
    }
}

fn missing_day_to_pb(policy: MissingDay) -> pb::MissingDayPolicy {
    match policy {
        MissingDay::Skip => pb::MissingDayPolicy::Skip,
        MissingDay::LastDay => pb::MissingDayPolicy::LastDay,
    }
}

fn std_duration(
    field: &str,
    d: Option<&prost_types::Duration>,
) -> Result<std::time::Duration, ValidationError> {
    match d {
        None => Ok(std::time::Duration::ZERO),
        Some(d) => {
            let ms = duration_ms(field, d)?;
            u64::try_from(ms)
                .map(std::time::Duration::from_millis)
                .map_err(|_| ValidationError::invalid(field, "must not be negative"))
        }
    }
}

/// A non-negative count of milliseconds as a protobuf duration (0 if negative).
pub(crate) fn ms_duration(ms: i64) -> prost_types::Duration {
    prost_duration(std::time::Duration::from_millis(
        u64::try_from(ms).unwrap_or(0),
    ))
}

pub(crate) fn prost_duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

impl TryFrom<pb::CreateRecurringRequest> for RecurringSpec {
    type Error = ValidationError;

    fn try_from(req: pb::CreateRecurringRequest) -> Result<Self, Self::Error> {
        let catch_up = match pb::CatchUpPolicy::try_from(req.catch_up) {
            Ok(pb::CatchUpPolicy::Unspecified | pb::CatchUpPolicy::Skip) => CatchUp::Skip,
            Ok(pb::CatchUpPolicy::One) => CatchUp::One,
            Ok(pb::CatchUpPolicy::All) => CatchUp::All,
            Err(_) => {
                return Err(ValidationError::invalid(
                    "catch_up",
                    format!("unknown policy {}", req.catch_up),
                ));
            }
        };
        let overlap = match pb::OverlapPolicy::try_from(req.overlap) {
            Ok(pb::OverlapPolicy::Unspecified | pb::OverlapPolicy::Allow) => Overlap::Allow,
            Ok(pb::OverlapPolicy::Skip) => Overlap::Skip,
            Err(_) => {
                return Err(ValidationError::invalid(
                    "overlap",
                    format!("unknown policy {}", req.overlap),
                ));
            }
        };
        Ok(RecurringSpec {
            overlap,
            queue: req.queue,
            payload: req.payload.into(),
            content_type: req.content_type,
            headers: req.headers.into_iter().collect(),
            spec: req.spec,
            time_zone: req.time_zone,
            missing_day: missing_day_from_pb(req.missing_day)?,
            start_at: req
                .start_at
                .as_ref()
                .map(|t| from_timestamp("start_at", t))
                .transpose()?,
            end_at: req
                .end_at
                .as_ref()
                .map(|t| from_timestamp("end_at", t))
                .transpose()?,
            max_occurrences: req.max_occurrences,
            jitter: std_duration("jitter", req.jitter.as_ref())?,
            catch_up,
            catch_up_limit: req.catch_up_limit,
            expire_after_ms: req
                .expire_after
                .as_ref()
                .map(|d| duration_ms("expire_after", d))
                .transpose()?,
            max_attempts: req.max_attempts,
            idempotency_key: req.idempotency_key,
        })
    }
}

impl From<Schedule> for pb::RecurringSchedule {
    fn from(s: Schedule) -> Self {
        let next_fire_times = s.upcoming(5).into_iter().map(timestamp).collect();
        pb::RecurringSchedule {
            id: s.id.to_string(),
            queue: s.queue,
            payload: s.payload.to_vec(),
            content_type: s.content_type,
            headers: s.headers.into_iter().collect(),
            spec: s.spec,
            time_zone: s.time_zone,
            missing_day: missing_day_to_pb(s.missing_day).into(),
            start_at: Some(timestamp(s.start_at)),
            end_at: s.end_at.map(timestamp),
            max_occurrences: s.max_occurrences,
            jitter: (!s.jitter.is_zero()).then(|| prost_duration(s.jitter)),
            catch_up: match s.catch_up {
                CatchUp::Skip => pb::CatchUpPolicy::Skip,
                CatchUp::One => pb::CatchUpPolicy::One,
                CatchUp::All => pb::CatchUpPolicy::All,
            }
            .into(),
            catch_up_limit: s.catch_up_limit,
            expire_after: s.expire_after_ms.map(ms_duration),
            max_attempts: s.max_attempts,
            idempotency_key: s.idempotency_key.unwrap_or_default(),
            paused: s.paused,
            occurrences: s.occurrences,
            next_fire_times,
            created_at: Some(timestamp(s.created_at)),
            updated_at: Some(timestamp(s.updated_at)),
            overlap: match s.overlap {
                Overlap::Allow => pb::OverlapPolicy::Allow,
                Overlap::Skip => pb::OverlapPolicy::Skip,
            }
            .into(),
        }
    }
}

/// Converts a ListRecurring request into a store filter.
pub(crate) fn schedule_filter(req: pb::ListRecurringRequest) -> Result<ScheduleFilter, AppError> {
    let list = listing(req.queue, req.page_size, &req.page_token)?;
    Ok(ScheduleFilter {
        queue: list.queue,
        paused: req.paused,
        before: list.before,
        limit: list.limit,
    })
}

impl From<SchedulePage> for pb::ListRecurringResponse {
    fn from(page: SchedulePage) -> Self {
        pb::ListRecurringResponse {
            schedules: page.schedules.into_iter().map(Into::into).collect(),
            next_page_token: page.next.map(|id| id.to_string()).unwrap_or_default(),
        }
    }
}

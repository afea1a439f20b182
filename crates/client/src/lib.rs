//! kairos-client: book, cancel and look up Kairos tasks from Rust.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kairos_client::ClientError> {
//! use std::time::Duration;
//! use kairos_client::{Client, NewTask};
//!
//! let mut client = Client::connect("http://127.0.0.1:50051").await?;
//! let task = client
//!     .schedule(NewTask::new("push").payload("hello").delay(Duration::from_secs(90)))
//!     .await?;
//! client.cancel(&task.id).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//! - [`Client`]: the SDK over the generated `SchedulerService` stub.
//! - [`NewTask`], [`Task`], [`TaskState`], [`Attempt`]: the types it takes and returns.
//! - [`ClientError`]: keeps the gRPC code and the field a bad request named.
#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use kairos_proto::v1 as pb;
use kairos_proto::v1::queue_service_client::QueueServiceClient;
use kairos_proto::v1::scheduler_service_client::SchedulerServiceClient;
use tonic::codec::CompressionEncoding;
use tonic::transport::{Channel, Endpoint};
use tonic_types::StatusExt;

pub use events::{EventStream, Subscribe, TaskEvent};
/// Generated protocol types, for callers that need them.
pub use kairos_proto::v1 as pb_types;
pub use queue::{Queue, QueueChange, QueueStats};
pub use recurring::{CatchUp, MissingDay, NewRecurring, Overlap, Recurring};

mod events;
mod queue;
mod recurring;

/// An error from the server or the connection.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {message}", code_name(*code))]
pub struct ClientError {
    /// gRPC status code.
    pub code: tonic::Code,
    /// Server message.
    pub message: String,
    /// The request field the server rejected, if it named one.
    pub field: Option<String>,
}

/// Returns the canonical upper-case name of a gRPC code, as grpcurl prints it.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

impl ClientError {
    /// Tells whether the same request may succeed later (a backend was down).
    pub fn is_retryable(&self) -> bool {
        matches!(self.code, tonic::Code::Unavailable)
    }
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        let field = status
            .get_details_bad_request()
            .and_then(|b| b.field_violations.first().map(|v| v.field.clone()));
        Self {
            code: status.code(),
            message: status.message().to_owned(),
            field,
        }
    }
}

impl From<tonic::transport::Error> for ClientError {
    fn from(err: tonic::transport::Error) -> Self {
        Self {
            code: tonic::Code::Unavailable,
            message: err.to_string(),
            field: None,
        }
    }
}

/// Where a task is in its life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskState {
    /// Waiting for its due time.
    Scheduled,
    /// Released to its queue.
    Dispatched,
    /// An attempt is running.
    Running,
    /// Done.
    Succeeded,
    /// Failed; will be retried.
    Retrying,
    /// Will not run again.
    Dead,
    /// Cancelled; never runs.
    Cancelled,
    /// Missed its start deadline; never runs.
    Expired,
    /// A recurring occurrence skipped while the previous one ran; never runs.
    Skipped,
    /// A state this client does not know.
    Unknown,
}

impl TaskState {
    /// Tells whether no further change will happen.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Dead | Self::Cancelled | Self::Expired | Self::Skipped
        )
    }

    /// Returns the lowercase name, as the CLI prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Dispatched => "dispatched",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Retrying => "retrying",
            Self::Dead => "dead",
            Self::Cancelled => "cancelled",
            Self::Expired => "expired",
            Self::Skipped => "skipped",
            Self::Unknown => "unknown",
        }
    }

    fn from_pb(value: i32) -> Self {
        match pb::TaskState::try_from(value) {
            Ok(pb::TaskState::Scheduled) => Self::Scheduled,
            Ok(pb::TaskState::Dispatched) => Self::Dispatched,
            Ok(pb::TaskState::Running) => Self::Running,
            Ok(pb::TaskState::Succeeded) => Self::Succeeded,
            Ok(pb::TaskState::Retrying) => Self::Retrying,
            Ok(pb::TaskState::Dead) => Self::Dead,
            Ok(pb::TaskState::Cancelled) => Self::Cancelled,
            Ok(pb::TaskState::Expired) => Self::Expired,
            Ok(pb::TaskState::Skipped) => Self::Skipped,
            _ => Self::Unknown,
        }
    }

    fn to_pb(self) -> pb::TaskState {
        match self {
            Self::Scheduled => pb::TaskState::Scheduled,
            Self::Dispatched => pb::TaskState::Dispatched,
            Self::Running => pb::TaskState::Running,
            Self::Succeeded => pb::TaskState::Succeeded,
            Self::Retrying => pb::TaskState::Retrying,
            Self::Dead => pb::TaskState::Dead,
            Self::Cancelled => pb::TaskState::Cancelled,
            Self::Expired => pb::TaskState::Expired,
            Self::Skipped => pb::TaskState::Skipped,
            Self::Unknown => pb::TaskState::Unspecified,
        }
    }
}

impl std::str::FromStr for TaskState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            Self::Scheduled,
            Self::Dispatched,
            Self::Running,
            Self::Succeeded,
            Self::Retrying,
            Self::Dead,
            Self::Cancelled,
            Self::Expired,
            Self::Skipped,
        ]
        .into_iter()
        .find(|state| state.as_str().eq_ignore_ascii_case(s))
        .ok_or_else(|| format!("unknown state `{s}`"))
    }
}

/// When a new task becomes due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// At an instant.
    At(DateTime<Utc>),
    /// After a delay from when the server receives the request.
    After(Duration),
}

/// A task to book. Build it with [`NewTask::new`] and the setters.
#[derive(Debug, Clone)]
pub struct NewTask {
    /// Queue.
    pub queue: String,
    /// Payload.
    pub payload: Bytes,
    /// Media type of the payload.
    pub content_type: String,
    /// Headers handed to the handler.
    pub headers: BTreeMap<String, String>,
    /// Due time; `None` sends neither (the server rejects it).
    pub due: Option<Due>,
    /// Idempotency key.
    pub idempotency_key: Option<String>,
    /// Start deadline after the due time.
    pub expire_after: Option<Duration>,
    /// Attempts allowed.
    pub max_attempts: Option<u32>,
    /// Own retry delays (initial, max, multiplier, jitter), over the queue's.
    pub backoff: Option<(Duration, Duration, f64, f64)>,
}

impl NewTask {
    /// Starts a task for `queue`, due now.
    pub fn new(queue: impl Into<String>) -> Self {
        Self {
            queue: queue.into(),
            payload: Bytes::new(),
            content_type: String::new(),
            headers: BTreeMap::new(),
            due: Some(Due::After(Duration::ZERO)),
            idempotency_key: None,
            expire_after: None,
            max_attempts: None,
            backoff: None,
        }
    }

    /// Sets the payload.
    pub fn payload(mut self, payload: impl Into<Bytes>) -> Self {
        self.payload = payload.into();
        self
    }

    /// Sets the payload's media type.
    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = content_type.into();
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Makes it due at an instant.
    pub fn at(mut self, at: DateTime<Utc>) -> Self {
        self.due = Some(Due::At(at));
        self
    }

    /// Makes it due after a delay.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.due = Some(Due::After(delay));
        self
    }

    /// Sets the idempotency key.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Sets how long after its due time the task may still start.
    pub fn expire_after(mut self, d: Duration) -> Self {
        self.expire_after = Some(d);
        self
    }

    /// Sets the attempts allowed.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }

    /// Sets this task's own retry delays over its queue's: `initial ×
    /// multiplier^(attempt-1)`, at most `max`, varied by `jitter` either way.
    pub fn backoff(
        mut self,
        initial: Duration,
        max: Duration,
        multiplier: f64,
        jitter: f64,
    ) -> Self {
        self.backoff = Some((initial, max, multiplier, jitter));
        self
    }

    fn into_pb(self) -> pb::ScheduleRequest {
        let (run_at, delay) = match self.due {
            Some(Due::At(t)) => (Some(timestamp(t)), None),
            Some(Due::After(d)) => (None, Some(duration(d))),
            None => (None, None),
        };
        pb::ScheduleRequest {
            queue: self.queue,
            payload: self.payload.to_vec(),
            content_type: self.content_type,
            headers: self.headers.into_iter().collect(),
            run_at,
            delay,
            idempotency_key: self.idempotency_key,
            expire_after: self.expire_after.map(duration),
            max_attempts: self.max_attempts,
            backoff: self
                .backoff
                .map(|(initial, max, multiplier, jitter)| pb::Backoff {
                    initial: Some(duration(initial)),
                    max: Some(duration(max)),
                    multiplier: Some(multiplier),
                    jitter: Some(jitter),
                }),
        }
    }
}

/// A booked task and its status.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// Sortable id.
    pub id: String,
    /// Queue.
    pub queue: String,
    /// Due instant.
    pub due_at: DateTime<Utc>,
    /// Current state.
    pub state: TaskState,
    /// Attempts started.
    pub attempts: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// When it was booked.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// Start deadline.
    pub expire_at: Option<DateTime<Utc>>,
    /// Idempotency key.
    pub idempotency_key: Option<String>,
    /// Error of the last failed attempt.
    pub last_error: Option<String>,
    /// The recurring schedule it is an occurrence of, and its nominal fire time.
    pub occurrence: Option<(String, DateTime<Utc>)>,
}

impl From<pb::Task> for Task {
    fn from(t: pb::Task) -> Self {
        Self {
            id: t.id,
            queue: t.queue,
            due_at: time(t.due_at),
            state: TaskState::from_pb(t.state),
            attempts: t.attempts,
            max_attempts: t.max_attempts,
            created_at: time(t.created_at),
            updated_at: time(t.updated_at),
            expire_at: t.expire_at.map(|ts| time(Some(ts))),
            idempotency_key: (!t.idempotency_key.is_empty()).then_some(t.idempotency_key),
            last_error: (!t.last_error.is_empty()).then_some(t.last_error),
            occurrence: (!t.schedule_id.is_empty()).then(|| (t.schedule_id, time(t.fire_at))),
        }
    }
}

/// One attempt of a task.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    /// Attempt number, from 1.
    pub attempt: u32,
    /// Worker that ran it.
    pub worker_id: String,
    /// Start.
    pub started_at: DateTime<Utc>,
    /// End, once ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// `succeeded`, `failed`, `terminal`, or `running`.
    pub outcome: &'static str,
    /// Error of a failed attempt.
    pub error: Option<String>,
    /// What the handler said about it (the webhook handler: HTTP status and answer).
    pub detail: Option<String>,
}

impl From<pb::TaskAttempt> for Attempt {
    fn from(a: pb::TaskAttempt) -> Self {
        let outcome = match pb::AttemptOutcome::try_from(a.outcome) {
            Ok(pb::AttemptOutcome::Succeeded) => "succeeded",
            Ok(pb::AttemptOutcome::Failed) => "failed",
            Ok(pb::AttemptOutcome::Terminal) => "terminal",
            _ => "running",
        };
        Self {
            attempt: a.attempt,
            worker_id: a.worker_id,
            started_at: time(a.started_at),
            finished_at: a.finished_at.map(|ts| time(Some(ts))),
            outcome,
            error: (!a.error.is_empty()).then_some(a.error),
            detail: (!a.detail.is_empty()).then_some(a.detail),
        }
    }
}

/// One page of [`Client::list_tasks`].
#[derive(Debug, Clone)]
pub struct TaskPage {
    /// Tasks, newest first.
    pub tasks: Vec<Task>,
    /// Token for the next page, if any.
    pub next_page_token: Option<String>,
}

fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    std::time::SystemTime::from(t).into()
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn time(t: Option<prost_types::Timestamp>) -> DateTime<Utc> {
    t.and_then(|t| DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .unwrap_or_default()
}

/// The Kairos client. Cheap to clone: one HTTP/2 connection underneath.
#[derive(Debug, Clone)]
pub struct Client {
    inner: SchedulerServiceClient<Channel>,
    queues: QueueServiceClient<Channel>,
}

impl Client {
    /// Connects to a kairos-server (`http://host:port`).
    pub async fn connect(url: impl Into<String>) -> Result<Self, ClientError> {
        let endpoint = Endpoint::from_shared(url.into())
            .map_err(|e| ClientError {
                code: tonic::Code::InvalidArgument,
                message: format!("bad server url: {e}"),
                field: None,
            })?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .tcp_nodelay(true);
        let channel = endpoint.connect().await?;
        Ok(Self::from_channel(channel))
    }

    /// Wraps an existing channel.
    pub fn from_channel(channel: Channel) -> Self {
        let queues = QueueServiceClient::new(channel.clone());
        let inner = SchedulerServiceClient::new(channel)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024);
        Self { inner, queues }
    }

    /// Compresses requests and asks for compressed answers (gzip): worth it
    /// over slow links; on a local network it costs more CPU than it saves,
    /// so it is off by default.
    #[must_use]
    pub fn with_gzip(mut self) -> Self {
        self.inner = self
            .inner
            .send_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Gzip);
        self
    }

    /// Books one task; it is durable when this returns.
    pub async fn schedule(&mut self, task: NewTask) -> Result<Task, ClientError> {
        let response = self.inner.schedule(task.into_pb()).await?.into_inner();
        Ok(response.task.unwrap_or_default().into())
    }

    /// Books up to 1,000 tasks; each item is stored or rejected on its own.
    pub async fn schedule_batch(
        &mut self,
        tasks: Vec<NewTask>,
    ) -> Result<Vec<Result<Task, ClientError>>, ClientError> {
        let request = pb::ScheduleBatchRequest {
            tasks: tasks.into_iter().map(NewTask::into_pb).collect(),
        };
        let response = self.inner.schedule_batch(request).await?.into_inner();
        Ok(response
            .results
            .into_iter()
            .map(|r| match r.result {
                Some(pb::schedule_batch_result::Result::Task(task)) => Ok(task.into()),
                Some(pb::schedule_batch_result::Result::Error(e)) => Err(ClientError {
                    code: tonic::Code::from_i32(e.code),
                    message: e.message,
                    field: (!e.field.is_empty()).then_some(e.field),
                }),
                None => Err(ClientError {
                    code: tonic::Code::Internal,
                    message: "empty batch result".into(),
                    field: None,
                }),
            })
            .collect())
    }

    /// Cancels a task no worker has started.
    pub async fn cancel(&mut self, id: &str) -> Result<Task, ClientError> {
        let request = pb::CancelRequest { id: id.to_owned() };
        let response = self.inner.cancel(request).await?.into_inner();
        Ok(response.task.unwrap_or_default().into())
    }

    /// Returns a task with every attempt so far.
    pub async fn get_task(&mut self, id: &str) -> Result<(Task, Vec<Attempt>), ClientError> {
        let request = pb::GetTaskRequest { id: id.to_owned() };
        let response = self.inner.get_task(request).await?.into_inner();
        Ok((
            response.task.unwrap_or_default().into(),
            response.attempts.into_iter().map(Into::into).collect(),
        ))
    }

    /// Returns one page of tasks, newest first.
    pub async fn list_tasks(
        &mut self,
        queue: Option<&str>,
        state: Option<TaskState>,
        page_size: u32,
        page_token: Option<&str>,
    ) -> Result<TaskPage, ClientError> {
        let request = pb::ListTasksRequest {
            queue: queue.unwrap_or_default().to_owned(),
            state: state
                .map_or(pb::TaskState::Unspecified, TaskState::to_pb)
                .into(),
            page_size,
            page_token: page_token.unwrap_or_default().to_owned(),
            schedule_id: String::new(),
        };
        let response = self.inner.list_tasks(request).await?.into_inner();
        Ok(TaskPage {
            tasks: response.tasks.into_iter().map(Into::into).collect(),
            next_page_token: (!response.next_page_token.is_empty())
                .then_some(response.next_page_token),
        })
    }

    /// Runs a DEAD task again with a fresh set of attempts; returns it DISPATCHED.
    pub async fn retry_task(&mut self, id: &str) -> Result<Task, ClientError> {
        let request = pb::RetryTaskRequest {
            id: id.to_owned(),
            ..Default::default()
        };
        let response = self.inner.retry_task(request).await?.into_inner();
        response
            .tasks
            .into_iter()
            .next()
            .map(Into::into)
            .ok_or_else(|| ClientError {
                code: tonic::Code::Internal,
                message: "RetryTask answered no task".into(),
                field: None,
            })
    }

    /// Runs again the newest `limit` DEAD tasks of `queue` whose last error
    /// contains `error_contains`; returns those re-run, and those that could
    /// not be (by id, with the reason).
    pub async fn retry_dead(
        &mut self,
        queue: &str,
        error_contains: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<Task>, BTreeMap<String, String>), ClientError> {
        let request = pb::RetryTaskRequest {
            id: String::new(),
            queue: queue.to_owned(),
            error_contains: error_contains.unwrap_or_default().to_owned(),
            limit,
        };
        let response = self.inner.retry_task(request).await?.into_inner();
        Ok((
            response.tasks.into_iter().map(Into::into).collect(),
            response.skipped.into_iter().collect(),
        ))
    }

    /// Returns the generated stub, for calls this wrapper does not cover.
    pub fn raw(&mut self) -> &mut SchedulerServiceClient<Channel> {
        &mut self.inner
    }
}

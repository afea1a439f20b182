//! Subscribe: task events as a `Stream`, resumed from the last cursor when
//! the connection or the server goes away.

use std::pin::Pin;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::Stream;
use kairos_proto::v1 as pb;
use tonic::Streaming;

use crate::{Client, ClientError, TaskState, time};

/// Which task events to follow, and from where. Filters combine with AND;
/// the values of one list with OR.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subscribe {
    /// Only these tasks.
    pub task_ids: Vec<String>,
    /// Only occurrences of this recurring schedule.
    pub schedule_id: Option<String>,
    /// Only this queue.
    pub queue: Option<String>,
    /// Only changes to these states.
    pub states: Vec<TaskState>,
    /// Replay every event after this cursor first.
    pub after_cursor: Option<u64>,
    /// Replay the whole history of the named tasks or schedule first.
    pub from_beginning: bool,
}

impl Subscribe {
    /// Every event from now on.
    pub fn all() -> Self {
        Self::default()
    }

    /// Only this task (may be repeated).
    #[must_use]
    pub fn task(mut self, id: impl Into<String>) -> Self {
        self.task_ids.push(id.into());
        self
    }

    /// Only occurrences of this recurring schedule.
    #[must_use]
    pub fn schedule(mut self, id: impl Into<String>) -> Self {
        self.schedule_id = Some(id.into());
        self
    }

    /// Only this queue.
    #[must_use]
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// Only changes to these states.
    #[must_use]
    pub fn states(mut self, states: impl IntoIterator<Item = TaskState>) -> Self {
        self.states = states.into_iter().collect();
        self
    }

    /// Replays every event after `cursor`, then follows live ones.
    #[must_use]
    pub fn after(mut self, cursor: u64) -> Self {
        self.after_cursor = Some(cursor);
        self.from_beginning = false;
        self
    }

    /// Replays the whole history of the named tasks or schedule first.
    #[must_use]
    pub fn from_beginning(mut self) -> Self {
        self.from_beginning = true;
        self.after_cursor = None;
        self
    }

    fn to_pb(&self) -> pb::SubscribeRequest {
        pb::SubscribeRequest {
            task_ids: self.task_ids.clone(),
            schedule_id: self.schedule_id.clone().unwrap_or_default(),
            queue: self.queue.clone().unwrap_or_default(),
            states: self.states.iter().map(|s| s.to_pb().into()).collect(),
            after_cursor: self.after_cursor,
            from_beginning: self.from_beginning,
        }
    }
}

/// One state change of one task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskEvent {
    /// Position in the installation-wide event log; resume after it.
    pub cursor: u64,
    /// Task id.
    pub task_id: String,
    /// Recurring schedule, for occurrences.
    pub schedule_id: Option<String>,
    /// Queue.
    pub queue: String,
    /// The attempt the event is about, or the attempts made so far.
    pub attempt: u32,
    /// The new state.
    pub state: TaskState,
    /// When it happened.
    pub time: DateTime<Utc>,
    /// Worker that started or finished the attempt.
    pub worker_id: Option<String>,
    /// Error text of a failed attempt.
    pub error: Option<String>,
}

impl From<pb::TaskEvent> for TaskEvent {
    fn from(e: pb::TaskEvent) -> Self {
        Self {
            cursor: e.cursor,
            task_id: e.task_id,
            schedule_id: (!e.schedule_id.is_empty()).then_some(e.schedule_id),
            queue: e.queue,
            attempt: e.attempt,
            state: TaskState::from_pb(e.state),
            time: time(e.time),
            worker_id: (!e.worker_id.is_empty()).then_some(e.worker_id),
            error: (!e.error.is_empty()).then_some(e.error),
        }
    }
}

/// A stream of task events.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<TaskEvent, ClientError>> + Send>>;

/// Tells whether a broken subscription can be resumed from its cursor: the
/// server went away, the connection broke, or the subscriber fell behind.
fn resumable(err: &ClientError) -> bool {
    matches!(
        err.code,
        tonic::Code::Unavailable | tonic::Code::Aborted | tonic::Code::Unknown
    )
}

/// Longest pause between two attempts to resume.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

struct Resuming {
    client: Client,
    subscription: Subscribe,
    stream: Option<Streaming<pb::SubscribeResponse>>,
    backoff: Duration,
    /// Gives up after this long without a working stream.
    patience: Duration,
    broken_since: Option<tokio::time::Instant>,
}

impl Resuming {
    async fn next(&mut self) -> Option<Result<TaskEvent, ClientError>> {
        loop {
            let stream = match &mut self.stream {
                Some(stream) => stream,
                None => match self.client.subscribe_once(&self.subscription).await {
                    Ok((stream, _)) => {
                        self.backoff = Duration::from_millis(100);
                        self.broken_since = None;
                        self.stream.insert(stream)
                    }
                    Err(err) => {
                        if let Some(err) = self.pause(err).await {
                            return Some(Err(err));
                        }
                        continue;
                    }
                },
            };
            match stream.message().await {
                Ok(Some(response)) => {
                    let Some(event) = response.event else {
                        continue;
                    };
                    // Resume after the last event handed out, never before it.
                    self.subscription = self.subscription.clone().after(event.cursor);
                    return Some(Ok(event.into()));
                }
                Ok(None) => {
                    self.stream = None;
                    if let Some(err) = self
                        .pause(ClientError {
                            code: tonic::Code::Unavailable,
                            message: "subscription ended".into(),
                            field: None,
                        })
                        .await
                    {
                        return Some(Err(err));
                    }
                }
                Err(status) => {
                    self.stream = None;
                    if let Some(err) = self.pause(status.into()).await {
                        return Some(Err(err));
                    }
                }
            }
        }
    }

    /// Waits before the next attempt; returns the error when it is not
    /// resumable or the stream has been broken for too long.
    async fn pause(&mut self, err: ClientError) -> Option<ClientError> {
        if !resumable(&err) {
            return Some(err);
        }
        let since = *self
            .broken_since
            .get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() > self.patience {
            return Some(err);
        }
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        None
    }
}

impl Client {
    /// Opens one Subscribe stream, as the server gives it: it ends with an
    /// error (ABORTED when the subscriber fell behind, UNAVAILABLE when the
    /// server shuts down) that [`Client::subscribe`] resumes from.
    /// Also returns the cursor the stream starts after, from which a
    /// subscription that has not seen an event yet resumes.
    pub async fn subscribe_once(
        &mut self,
        subscription: &Subscribe,
    ) -> Result<(Streaming<pb::SubscribeResponse>, u64), ClientError> {
        let response = self.inner.subscribe(subscription.to_pb()).await?;
        let start = response
            .metadata()
            .get(kairos_proto::wire::RESUME_TRAILER)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        Ok((response.into_inner(), start))
    }

    /// Follows task events as a stream. When the stream breaks (the server
    /// shuts down, the connection drops, the subscriber fell behind) it is
    /// opened again after the last event received, so no event is missed
    /// or repeated; it gives up after `patience` without a working stream.
    /// The first stream is open when this returns.
    pub async fn subscribe(
        &self,
        subscription: Subscribe,
        patience: Duration,
    ) -> Result<EventStream, ClientError> {
        let mut client = self.clone();
        let (first, start) = client.subscribe_once(&subscription).await?;
        let state = Resuming {
            client,
            // A resume before the first event continues from where this began.
            subscription: subscription.after(start),
            stream: Some(first),
            backoff: Duration::from_millis(100),
            patience,
            broken_since: None,
        };
        Ok(Box::pin(futures::stream::unfold(
            state,
            |mut state| async move {
                let item = state.next().await?;
                Some((item, state))
            },
        )))
    }
}

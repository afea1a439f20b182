//! Queues from the client: create, change, pause, resume and inspect them.

use std::time::Duration;

use chrono::{DateTime, Utc};
use kairos_proto::v1 as pb;

use crate::{Client, ClientError, duration, time};

/// Settings to give a queue: every field left `None` keeps its current value
/// (or, when creating, takes the server default).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueChange {
    /// Most tasks running at once across every worker; 0 for no limit.
    pub max_concurrency: Option<u32>,
    /// Attempts per task booked without its own.
    pub max_attempts: Option<u32>,
    /// Delay before the second attempt.
    pub initial_backoff: Option<Duration>,
    /// Longest delay between attempts.
    pub max_backoff: Option<Duration>,
    /// Growth of the delay per attempt.
    pub multiplier: Option<f64>,
    /// Random variation of each delay (fraction either way).
    pub jitter: Option<f64>,
    /// Redelivery after this long without a sign of life.
    pub run_timeout: Option<Duration>,
    /// Start deadline after the due time for tasks booked without one;
    /// `Some(None)` clears it.
    pub expire_after: Option<Option<Duration>>,
    /// Most attempts started per second across every worker; 0 for no limit.
    pub rate_limit: Option<f64>,
    /// Starts allowed at once after a quiet spell (at least 1).
    pub rate_burst: Option<u32>,
}

impl QueueChange {
    /// No change yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the global concurrency (0 for no limit).
    #[must_use]
    pub fn max_concurrency(mut self, n: u32) -> Self {
        self.max_concurrency = Some(n);
        self
    }

    /// Sets the default attempts.
    #[must_use]
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }

    /// Sets the backoff: first delay, longest delay, growth per attempt and jitter.
    #[must_use]
    pub fn backoff(
        mut self,
        initial: Duration,
        max: Duration,
        multiplier: f64,
        jitter: f64,
    ) -> Self {
        self.initial_backoff = Some(initial);
        self.max_backoff = Some(max);
        self.multiplier = Some(multiplier);
        self.jitter = Some(jitter);
        self
    }

    /// Sets the run timeout.
    #[must_use]
    pub fn run_timeout(mut self, d: Duration) -> Self {
        self.run_timeout = Some(d);
        self
    }

    /// Sets the rate limit: starts per second across every worker (0 for
    /// none), and how many may start at once after a quiet spell.
    #[must_use]
    pub fn rate_limit(mut self, per_second: f64, burst: u32) -> Self {
        self.rate_limit = Some(per_second);
        self.rate_burst = Some(burst);
        self
    }

    /// Sets (or with `None` clears) the default start deadline.
    #[must_use]
    pub fn expire_after(mut self, d: Option<Duration>) -> Self {
        self.expire_after = Some(d);
        self
    }

    /// Returns the settings message and the update mask naming what is set.
    fn to_pb(&self) -> (pb::QueueSettings, Vec<String>) {
        let mut mask = Vec::new();
        let mut note = |set: bool, path: &str| {
            if set {
                mask.push(path.to_owned());
            }
        };
        note(self.max_concurrency.is_some(), "max_concurrency");
        note(self.max_attempts.is_some(), "retry.max_attempts");
        note(self.initial_backoff.is_some(), "retry.initial_backoff");
        note(self.max_backoff.is_some(), "retry.max_backoff");
        note(self.multiplier.is_some(), "retry.multiplier");
        note(self.jitter.is_some(), "retry.jitter");
        note(self.run_timeout.is_some(), "run_timeout");
        note(self.expire_after.is_some(), "expire_after");
        note(self.rate_limit.is_some(), "rate_limit");
        note(self.rate_burst.is_some(), "rate_burst");
        let settings = pb::QueueSettings {
            max_concurrency: self.max_concurrency,
            retry: Some(pb::RetryPolicy {
                max_attempts: self.max_attempts,
                initial_backoff: self.initial_backoff.map(duration),
                max_backoff: self.max_backoff.map(duration),
                multiplier: self.multiplier,
                jitter: self.jitter,
            }),
            run_timeout: self.run_timeout.map(duration),
            expire_after: self.expire_after.flatten().map(duration),
            rate_limit: self.rate_limit,
            rate_burst: self.rate_burst,
        };
        (settings, mask)
    }
}

/// A queue and its settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Queue {
    /// Name.
    pub name: String,
    /// Most tasks running at once across every worker; 0 for no limit.
    pub max_concurrency: u32,
    /// Attempts per task booked without its own.
    pub max_attempts: u32,
    /// Delay before the second attempt.
    pub initial_backoff: Duration,
    /// Longest delay between attempts.
    pub max_backoff: Duration,
    /// Growth of the delay per attempt.
    pub multiplier: f64,
    /// Random variation of each delay.
    pub jitter: f64,
    /// Redelivery after this long without a sign of life.
    pub run_timeout: Duration,
    /// Default start deadline after the due time.
    pub expire_after: Option<Duration>,
    /// Most attempts started per second; 0 for no limit.
    pub rate_limit: f64,
    /// Starts allowed at once after a quiet spell.
    pub rate_burst: u32,
    /// Whether releases to workers are paused.
    pub paused: bool,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When its settings last changed.
    pub updated_at: DateTime<Utc>,
}

/// Live figures of a queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Scheduled, not due yet.
    pub scheduled: u64,
    /// Due and not started (released, or waiting while paused).
    pub waiting: u64,
    /// Running.
    pub running: u64,
    /// Waiting for another attempt.
    pub retrying: u64,
    /// Succeeded in the last hour.
    pub succeeded_last_hour: u64,
    /// Failed attempts in the last hour.
    pub failed_last_hour: u64,
    /// Dead in the last hour.
    pub dead_last_hour: u64,
    /// How late the oldest waiting task is.
    pub oldest_waiting_lateness: Option<Duration>,
}

fn std_duration(d: Option<prost_types::Duration>) -> Duration {
    d.and_then(|d| {
        Some(Duration::new(
            u64::try_from(d.seconds).ok()?,
            u32::try_from(d.nanos).ok()?,
        ))
    })
    .unwrap_or_default()
}

impl From<pb::Queue> for Queue {
    fn from(q: pb::Queue) -> Self {
        let s = q.settings.unwrap_or_default();
        let r = s.retry.unwrap_or_default();
        Self {
            name: q.name,
            max_concurrency: s.max_concurrency.unwrap_or(0),
            max_attempts: r.max_attempts.unwrap_or(0),
            initial_backoff: std_duration(r.initial_backoff),
            max_backoff: std_duration(r.max_backoff),
            multiplier: r.multiplier.unwrap_or(1.0),
            jitter: r.jitter.unwrap_or(0.0),
            run_timeout: std_duration(s.run_timeout),
            expire_after: s.expire_after.map(|d| std_duration(Some(d))),
            rate_limit: s.rate_limit.unwrap_or(0.0),
            rate_burst: s.rate_burst.unwrap_or(1),
            paused: q.paused,
            created_at: time(q.created_at),
            updated_at: time(q.updated_at),
        }
    }
}

impl From<pb::QueueStats> for QueueStats {
    fn from(s: pb::QueueStats) -> Self {
        Self {
            scheduled: s.scheduled,
            waiting: s.waiting,
            running: s.running,
            retrying: s.retrying,
            succeeded_last_hour: s.succeeded_last_hour,
            failed_last_hour: s.failed_last_hour,
            dead_last_hour: s.dead_last_hour,
            oldest_waiting_lateness: s.oldest_waiting_lateness.map(|d| std_duration(Some(d))),
        }
    }
}

fn queue_of(q: Option<pb::Queue>) -> Queue {
    q.unwrap_or_default().into()
}

impl Client {
    /// Creates a queue; settings left unset take the server defaults.
    pub async fn create_queue(
        &mut self,
        name: &str,
        settings: QueueChange,
    ) -> Result<Queue, ClientError> {
        let (settings, _) = settings.to_pb();
        let request = pb::CreateQueueRequest {
            name: name.to_owned(),
            settings: Some(settings),
        };
        let response = self.queues.create_queue(request).await?.into_inner();
        Ok(queue_of(response.queue))
    }

    /// Changes the settings `change` sets; running workers follow.
    pub async fn update_queue(
        &mut self,
        name: &str,
        change: QueueChange,
    ) -> Result<Queue, ClientError> {
        let (settings, paths) = change.to_pb();
        let request = pb::UpdateQueueRequest {
            name: name.to_owned(),
            settings: Some(settings),
            update_mask: Some(prost_types::FieldMask { paths }),
        };
        let response = self.queues.update_queue(request).await?.into_inner();
        Ok(queue_of(response.queue))
    }

    /// Returns a queue and its live figures.
    pub async fn get_queue(&mut self, name: &str) -> Result<(Queue, QueueStats), ClientError> {
        let request = pb::GetQueueRequest {
            name: name.to_owned(),
        };
        let response = self.queues.get_queue(request).await?.into_inner();
        Ok((
            queue_of(response.queue),
            response.stats.unwrap_or_default().into(),
        ))
    }

    /// Returns every queue, by name.
    pub async fn list_queues(&mut self) -> Result<Vec<Queue>, ClientError> {
        let response = self
            .queues
            .list_queues(pb::ListQueuesRequest {})
            .await?
            .into_inner();
        Ok(response.queues.into_iter().map(Into::into).collect())
    }

    /// Stops releasing the queue's tasks to workers; due tasks wait.
    pub async fn pause_queue(&mut self, name: &str) -> Result<Queue, ClientError> {
        let request = pb::PauseQueueRequest {
            name: name.to_owned(),
        };
        let response = self.queues.pause_queue(request).await?.into_inner();
        Ok(queue_of(response.queue))
    }

    /// Releases waiting tasks again, oldest first.
    pub async fn resume_queue(&mut self, name: &str) -> Result<Queue, ClientError> {
        let request = pb::ResumeQueueRequest {
            name: name.to_owned(),
        };
        let response = self.queues.resume_queue(request).await?.into_inner();
        Ok(queue_of(response.queue))
    }
}

//! Recurring schedules from the client: create, look up, pause, resume,
//! delete, preview, and list a schedule's occurrences.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use kairos_proto::v1 as pb;

use crate::{Client, ClientError, TaskPage, duration, time, timestamp};

/// What a recurring schedule does in a month without its day of month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingDay {
    /// No occurrence that month.
    #[default]
    Skip,
    /// The occurrence moves to the month's last day.
    LastDay,
}

impl MissingDay {
    fn to_pb(self) -> pb::MissingDayPolicy {
        match self {
            Self::Skip => pb::MissingDayPolicy::Skip,
            Self::LastDay => pb::MissingDayPolicy::LastDay,
        }
    }
}

/// What a schedule does with fire times missed while Kairos was down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CatchUp {
    /// Missed fire times never run.
    #[default]
    Skip,
    /// The latest missed fire time runs once.
    One,
    /// Every missed fire time runs, up to the schedule's limit.
    All,
}

/// Whether an occurrence may start while the previous one has not finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overlap {
    /// Occurrences run whatever the previous one is doing.
    #[default]
    Allow,
    /// An occurrence due while the previous one runs (or waits to retry) is SKIPPED.
    Skip,
}

/// A recurring schedule to create. Build it with [`NewRecurring::new`].
#[derive(Debug, Clone, Default)]
pub struct NewRecurring {
    /// Queue of every occurrence.
    pub queue: String,
    /// Cron spec or `every <duration>`.
    pub spec: String,
    /// IANA zone; UTC when empty.
    pub time_zone: String,
    /// Payload of every occurrence.
    pub payload: Bytes,
    /// Media type of the payload.
    pub content_type: String,
    /// Headers of every occurrence.
    pub headers: BTreeMap<String, String>,
    /// Policy for days a month lacks.
    pub missing_day: MissingDay,
    /// No fire time before this.
    pub start_at: Option<DateTime<Utc>>,
    /// No fire time after this.
    pub end_at: Option<DateTime<Utc>>,
    /// Most occurrences; 0 for no limit.
    pub max_occurrences: u32,
    /// Largest delay added to each occurrence's due time.
    pub jitter: Duration,
    /// Policy for missed fire times.
    pub catch_up: CatchUp,
    /// Most missed fire times run under [`CatchUp::All`]; 0 for the server default.
    pub catch_up_limit: u32,
    /// Whether an occurrence may start while the previous one has not finished.
    pub overlap: Overlap,
    /// Start deadline of each occurrence after its due time.
    pub expire_after: Option<Duration>,
    /// Attempts of each occurrence.
    pub max_attempts: Option<u32>,
    /// Idempotency key.
    pub idempotency_key: Option<String>,
}

impl NewRecurring {
    /// Starts a schedule of `spec` (cron, or `every 90s`) on `queue`, in UTC.
    pub fn new(queue: impl Into<String>, spec: impl Into<String>) -> Self {
        Self {
            queue: queue.into(),
            spec: spec.into(),
            ..Self::default()
        }
    }

    /// Reads the spec in an IANA time zone.
    pub fn time_zone(mut self, zone: impl Into<String>) -> Self {
        self.time_zone = zone.into();
        self
    }

    /// Sets the payload of every occurrence.
    pub fn payload(mut self, payload: impl Into<Bytes>) -> Self {
        self.payload = payload.into();
        self
    }

    /// Sets the policy for days a month lacks.
    pub fn missing_day(mut self, policy: MissingDay) -> Self {
        self.missing_day = policy;
        self
    }

    /// Sets the first instant a fire time may fall on.
    pub fn start_at(mut self, at: DateTime<Utc>) -> Self {
        self.start_at = Some(at);
        self
    }

    /// Sets the last instant a fire time may fall on.
    pub fn end_at(mut self, at: DateTime<Utc>) -> Self {
        self.end_at = Some(at);
        self
    }

    /// Stops after this many occurrences.
    pub fn max_occurrences(mut self, n: u32) -> Self {
        self.max_occurrences = n;
        self
    }

    /// Delays each occurrence by up to this much (fixed per occurrence).
    pub fn jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    /// Sets the policy for missed fire times.
    pub fn catch_up(mut self, policy: CatchUp) -> Self {
        self.catch_up = policy;
        self
    }

    /// Sets the overlap policy.
    pub fn overlap(mut self, policy: Overlap) -> Self {
        self.overlap = policy;
        self
    }

    /// Sets the attempts of each occurrence.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }

    /// Sets the idempotency key.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    fn into_pb(self) -> pb::CreateRecurringRequest {
        pb::CreateRecurringRequest {
            queue: self.queue,
            payload: self.payload.to_vec(),
            content_type: self.content_type,
            headers: self.headers.into_iter().collect(),
            spec: self.spec,
            time_zone: self.time_zone,
            missing_day: self.missing_day.to_pb().into(),
            start_at: self.start_at.map(timestamp),
            end_at: self.end_at.map(timestamp),
            max_occurrences: self.max_occurrences,
            jitter: (!self.jitter.is_zero()).then(|| duration(self.jitter)),
            catch_up: match self.catch_up {
                CatchUp::Skip => pb::CatchUpPolicy::Skip,
                CatchUp::One => pb::CatchUpPolicy::One,
                CatchUp::All => pb::CatchUpPolicy::All,
            }
            .into(),
            catch_up_limit: self.catch_up_limit,
            overlap: match self.overlap {
                Overlap::Allow => pb::OverlapPolicy::Allow,
                Overlap::Skip => pb::OverlapPolicy::Skip,
            }
            .into(),
            expire_after: self.expire_after.map(duration),
            max_attempts: self.max_attempts,
            idempotency_key: self.idempotency_key,
        }
    }
}

/// A stored recurring schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Recurring {
    /// Sortable id.
    pub id: String,
    /// Queue of every occurrence.
    pub queue: String,
    /// The spec.
    pub spec: String,
    /// IANA zone.
    pub time_zone: String,
    /// Paused schedules make no occurrences.
    pub paused: bool,
    /// Occurrences made so far.
    pub occurrences: u64,
    /// The next fire times not yet made into tasks (up to 5).
    pub next_fire_times: Vec<DateTime<Utc>>,
    /// Creation instant.
    pub created_at: DateTime<Utc>,
}

impl From<pb::RecurringSchedule> for Recurring {
    fn from(s: pb::RecurringSchedule) -> Self {
        Self {
            id: s.id,
            queue: s.queue,
            spec: s.spec,
            time_zone: s.time_zone,
            paused: s.paused,
            occurrences: s.occurrences,
            next_fire_times: s
                .next_fire_times
                .into_iter()
                .map(|t| time(Some(t)))
                .collect(),
            created_at: time(s.created_at),
        }
    }
}

fn schedule(s: Option<pb::RecurringSchedule>) -> Result<Recurring, ClientError> {
    s.map(Into::into).ok_or_else(|| ClientError {
        code: tonic::Code::Internal,
        message: "response without a schedule".into(),
        field: None,
    })
}

impl Client {
    /// Creates a recurring schedule; each fire time becomes a task.
    pub async fn create_recurring(&mut self, new: NewRecurring) -> Result<Recurring, ClientError> {
        let response = self.inner.create_recurring(new.into_pb()).await?;
        schedule(response.into_inner().schedule)
    }

    /// Returns a schedule with its next fire times.
    pub async fn get_recurring(&mut self, id: &str) -> Result<Recurring, ClientError> {
        let request = pb::GetRecurringRequest { id: id.to_owned() };
        schedule(
            self.inner
                .get_recurring(request)
                .await?
                .into_inner()
                .schedule,
        )
    }

    /// Lists schedules, newest first: one page and the token of the next.
    pub async fn list_recurring(
        &mut self,
        queue: Option<&str>,
        paused: Option<bool>,
        page_size: u32,
        page_token: Option<&str>,
    ) -> Result<(Vec<Recurring>, Option<String>), ClientError> {
        let request = pb::ListRecurringRequest {
            queue: queue.unwrap_or_default().to_owned(),
            paused,
            page_size,
            page_token: page_token.unwrap_or_default().to_owned(),
        };
        let response = self.inner.list_recurring(request).await?.into_inner();
        Ok((
            response.schedules.into_iter().map(Into::into).collect(),
            (!response.next_page_token.is_empty()).then_some(response.next_page_token),
        ))
    }

    /// Changes the fields of a schedule named in `fields` (for example
    /// `["spec", "time_zone"]`), taking the values from `changes`. The change
    /// takes effect from the next fire time not yet made into a task.
    pub async fn update_recurring(
        &mut self,
        id: &str,
        changes: NewRecurring,
        fields: &[&str],
    ) -> Result<Recurring, ClientError> {
        let request = pb::UpdateRecurringRequest {
            id: id.to_owned(),
            schedule: Some(changes.into_pb()),
            update_mask: Some(prost_types::FieldMask {
                paths: fields.iter().map(|f| (*f).to_owned()).collect(),
            }),
        };
        schedule(
            self.inner
                .update_recurring(request)
                .await?
                .into_inner()
                .schedule,
        )
    }

    /// Stops new occurrences.
    pub async fn pause_recurring(&mut self, id: &str) -> Result<Recurring, ClientError> {
        let request = pb::PauseRecurringRequest { id: id.to_owned() };
        schedule(
            self.inner
                .pause_recurring(request)
                .await?
                .into_inner()
                .schedule,
        )
    }

    /// Continues a paused schedule under its catch-up policy.
    pub async fn resume_recurring(&mut self, id: &str) -> Result<Recurring, ClientError> {
        let request = pb::ResumeRecurringRequest { id: id.to_owned() };
        schedule(
            self.inner
                .resume_recurring(request)
                .await?
                .into_inner()
                .schedule,
        )
    }

    /// Deletes a schedule; with `cancel_pending`, cancels its occurrences no
    /// worker has started. Returns how many were cancelled.
    pub async fn delete_recurring(
        &mut self,
        id: &str,
        cancel_pending: bool,
    ) -> Result<u32, ClientError> {
        let request = pb::DeleteRecurringRequest {
            id: id.to_owned(),
            cancel_pending,
        };
        Ok(self
            .inner
            .delete_recurring(request)
            .await?
            .into_inner()
            .cancelled)
    }

    /// Lists the occurrences (tasks) of a schedule, newest first.
    pub async fn list_occurrences(
        &mut self,
        schedule_id: &str,
        page_size: u32,
        page_token: Option<&str>,
    ) -> Result<TaskPage, ClientError> {
        let request = pb::ListTasksRequest {
            schedule_id: schedule_id.to_owned(),
            page_size,
            page_token: page_token.unwrap_or_default().to_owned(),
            ..Default::default()
        };
        let response = self.inner.list_tasks(request).await?.into_inner();
        Ok(TaskPage {
            tasks: response.tasks.into_iter().map(Into::into).collect(),
            next_page_token: (!response.next_page_token.is_empty())
                .then_some(response.next_page_token),
        })
    }

    /// Lists when a recurring spec would fire after `from` (now when `None`),
    /// in `time_zone` (UTC when empty), storing nothing.
    pub async fn preview_recurring(
        &mut self,
        spec: &str,
        time_zone: &str,
        from: Option<DateTime<Utc>>,
        count: u32,
        missing_day: MissingDay,
    ) -> Result<Vec<DateTime<Utc>>, ClientError> {
        let request = pb::PreviewRecurringRequest {
            spec: spec.to_owned(),
            time_zone: time_zone.to_owned(),
            from: from.map(timestamp),
            count,
            missing_day: missing_day.to_pb().into(),
        };
        let response = self.inner.preview_recurring(request).await?.into_inner();
        Ok(response
            .fire_times
            .into_iter()
            .map(|t| time(Some(t)))
            .collect())
    }
}

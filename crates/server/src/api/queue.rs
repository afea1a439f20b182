//! `kairos.v1.QueueService`: unwrap, convert, call, convert back.

use chrono::Utc;
use kairos_proto::v1 as pb;
use kairos_proto::v1::queue_service_server::QueueService as QueueRpc;
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::convert::{duration_ms, ms_duration, timestamp};
use crate::app::{AppError, QueueDetail, QueueService};
use crate::domain::{Queue, QueueUpdate, ValidationError};

/// The QueueService implementation.
#[derive(Debug, Clone)]
pub struct QueueApi {
    queues: QueueService,
}

impl QueueApi {
    /// Creates the API over the queue use cases.
    pub fn new(queues: QueueService) -> Self {
        Self { queues }
    }
}

fn queue_to_pb(q: Queue) -> pb::Queue {
    let s = q.settings;
    pb::Queue {
        name: q.name,
        settings: Some(pb::QueueSettings {
            max_concurrency: Some(s.max_concurrency),
            retry: Some(pb::RetryPolicy {
                max_attempts: Some(s.retry.max_attempts),
                initial_backoff: Some(ms_duration(s.retry.initial_backoff_ms)),
                max_backoff: Some(ms_duration(s.retry.max_backoff_ms)),
                multiplier: Some(s.retry.multiplier),
                jitter: Some(s.retry.jitter),
            }),
            run_timeout: Some(ms_duration(s.run_timeout_ms)),
            expire_after: s.expire_after_ms.map(ms_duration),
            rate_limit: Some(s.rate_per_s),
            rate_burst: Some(s.rate_burst),
        }),
        paused: q.paused,
        created_at: Some(timestamp(q.created_at)),
        updated_at: Some(timestamp(q.updated_at)),
    }
}

fn detail_to_pb(d: QueueDetail) -> pb::GetQueueResponse {
    let stats = d.stats;
    let lateness = stats
        .oldest_waiting_due
        .map(|due| ms_duration((Utc::now() - due).num_milliseconds().max(0)));
    pb::GetQueueResponse {
        queue: Some(queue_to_pb(d.queue)),
        stats: Some(pb::QueueStats {
            scheduled: stats.scheduled,
            waiting: stats.waiting,
            running: stats.running,
            retrying: stats.retrying,
            succeeded_last_hour: stats.succeeded_last_hour,
            failed_last_hour: stats.failed_last_hour,
            dead_last_hour: stats.dead_last_hour,
            oldest_waiting_lateness: lateness,
        }),
    }
}

/// Tells whether an update names `field` (always, for a create).
fn named(mask: Option<&[String]>, field: &str) -> bool {
    mask.is_none_or(|m| {
        m.iter()
            .any(|p| p == field || (field.starts_with("retry.") && p == "retry"))
    })
}

/// Returns the value of `field` if the request names it: with a mask, a
/// named field must carry a value; without one, absent means the default.
fn pick<T>(
    mask: Option<&[String]>,
    field: &str,
    value: Option<T>,
) -> Result<Option<T>, ValidationError> {
    if !named(mask, field) {
        return Ok(None);
    }
    match (value, mask.is_some()) {
        (Some(v), _) => Ok(Some(v)),
        (None, false) => Ok(None),
        (None, true) => Err(ValidationError::invalid(
            format!("settings.{field}"),
            "is named in update_mask but not set",
        )),
    }
}

/// Reads the settings a request names: every field present (create), or
/// only those in `mask` (update), each of which must then be present.
fn settings_update(
    settings: Option<pb::QueueSettings>,
    mask: Option<&[String]>,
) -> Result<QueueUpdate, ValidationError> {
    let s = settings.unwrap_or_default();
    let retry = s.retry.unwrap_or_default();
    let duration = |field: &str, d: Option<prost_types::Duration>| {
        d.map(|d| duration_ms(&format!("settings.{field}"), &d))
            .transpose()
    };
    if let Some(mask) = mask {
        const FIELDS: [&str; 10] = [
            "rate_limit",
            "rate_burst",
            "max_concurrency",
            "retry",
            "retry.max_attempts",
            "retry.initial_backoff",
            "retry.max_backoff",
            "retry.multiplier",
            "retry.jitter",
            "run_timeout",
        ];
        if mask.is_empty() {
            return Err(ValidationError::invalid(
                "update_mask",
                "names no field to change",
            ));
        }
        if let Some(unknown) = mask
            .iter()
            .find(|p| !FIELDS.contains(&p.as_str()) && p.as_str() != "expire_after")
        {
            return Err(ValidationError::invalid(
                "update_mask",
                format!("`{unknown}` is not a queue setting"),
            ));
        }
    }
    Ok(QueueUpdate {
        max_concurrency: pick(mask, "max_concurrency", s.max_concurrency)?,
        max_attempts: pick(mask, "retry.max_attempts", retry.max_attempts)?,
        initial_backoff_ms: pick(
            mask,
            "retry.initial_backoff",
            duration("retry.initial_backoff", retry.initial_backoff)?,
        )?,
        max_backoff_ms: pick(
            mask,
            "retry.max_backoff",
            duration("retry.max_backoff", retry.max_backoff)?,
        )?,
        multiplier: pick(mask, "retry.multiplier", retry.multiplier)?,
        jitter: pick(mask, "retry.jitter", retry.jitter)?,
        run_timeout_ms: pick(mask, "run_timeout", duration("run_timeout", s.run_timeout)?)?,
        rate_per_s: pick(mask, "rate_limit", s.rate_limit)?,
        rate_burst: pick(mask, "rate_burst", s.rate_burst)?,
        // Unset clears it, so it is never "named but not set".
        expire_after_ms: if named(mask, "expire_after") {
            let value = duration("expire_after", s.expire_after)?;
            (mask.is_some() || value.is_some()).then_some(value)
        } else {
            None
        },
    })
}

#[tonic::async_trait]
impl QueueRpc for QueueApi {
    #[instrument(skip_all)]
    async fn create_queue(
        &self,
        request: Request<pb::CreateQueueRequest>,
    ) -> Result<Response<pb::CreateQueueResponse>, Status> {
        let request = request.into_inner();
        let update = settings_update(request.settings, None).map_err(AppError::from)?;
        let queue = self.queues.create(&request.name, &update).await?;
        Ok(Response::new(pb::CreateQueueResponse {
            queue: Some(queue_to_pb(queue)),
        }))
    }

    #[instrument(skip_all)]
    async fn update_queue(
        &self,
        request: Request<pb::UpdateQueueRequest>,
    ) -> Result<Response<pb::UpdateQueueResponse>, Status> {
        let request = request.into_inner();
        let mask = request.update_mask.map(|m| m.paths).unwrap_or_default();
        let update = settings_update(request.settings, Some(&mask)).map_err(AppError::from)?;
        let queue = self.queues.update(&request.name, &update).await?;
        Ok(Response::new(pb::UpdateQueueResponse {
            queue: Some(queue_to_pb(queue)),
        }))
    }

    #[instrument(skip_all)]
    async fn get_queue(
        &self,
        request: Request<pb::GetQueueRequest>,
    ) -> Result<Response<pb::GetQueueResponse>, Status> {
        let detail = self.queues.get(&request.into_inner().name).await?;
        Ok(Response::new(detail_to_pb(detail)))
    }

    #[instrument(skip_all)]
    async fn list_queues(
        &self,
        _request: Request<pb::ListQueuesRequest>,
    ) -> Result<Response<pb::ListQueuesResponse>, Status> {
        let queues = self.queues.list().await?;
        Ok(Response::new(pb::ListQueuesResponse {
            queues: queues.into_iter().map(queue_to_pb).collect(),
        }))
    }

    #[instrument(skip_all)]
    async fn pause_queue(
        &self,
        request: Request<pb::PauseQueueRequest>,
    ) -> Result<Response<pb::PauseQueueResponse>, Status> {
        let queue = self
            .queues
            .set_paused(&request.into_inner().name, true)
            .await?;
        Ok(Response::new(pb::PauseQueueResponse {
            queue: Some(queue_to_pb(queue)),
        }))
    }

    #[instrument(skip_all)]
    async fn resume_queue(
        &self,
        request: Request<pb::ResumeQueueRequest>,
    ) -> Result<Response<pb::ResumeQueueResponse>, Status> {
        let queue = self
            .queues
            .set_paused(&request.into_inner().name, false)
            .await?;
        Ok(Response::new(pb::ResumeQueueResponse {
            queue: Some(queue_to_pb(queue)),
        }))
    }
}

//! `kairos.v1.SchedulerService`: unwrap, convert, call, convert back.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use kairos_proto::v1 as pb;
use kairos_proto::v1::scheduler_service_server::SchedulerService;
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::convert;
use super::error::{item_error, log_unavailable_items};
use crate::app::{AppError, EventService, RecurringService, SubscribeEnd, TaskService};
use crate::domain::{RecurringSpec, ScheduleSpec, ValidationError};

/// Most tasks one ScheduleBatch call may carry.
pub const MAX_BATCH: usize = 1000;

/// Stream of events to one subscriber.
pub(crate) type SubscribeStream =
    Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>;

/// The SchedulerService implementation.
#[derive(Debug, Clone)]
pub struct SchedulerApi {
    tasks: TaskService,
    recurring: RecurringService,
    events: EventService,
}

impl SchedulerApi {
    /// Creates the API over the task, recurring-schedule and event use cases.
    pub fn new(tasks: TaskService, recurring: RecurringService, events: EventService) -> Self {
        Self {
            tasks,
            recurring,
            events,
        }
    }
}

/// Turns the end of a subscription into the status the subscriber sees,
/// with the cursor to resume after in a trailer and in the message.
fn end_status(end: SubscribeEnd) -> Status {
    let (mut status, after) = match end {
        SubscribeEnd::Lagged { after, buffer } => (
            Status::aborted(format!(
                "subscriber fell more than {buffer} events behind; \
                 resume with after_cursor={after}"
            )),
            after,
        ),
        SubscribeEnd::ShuttingDown { after } => (
            Status::unavailable(format!(
                "server shutting down; resume on another replica with after_cursor={after}"
            )),
            after,
        ),
        SubscribeEnd::Unavailable { after, cause } => {
            tracing::warn!(cause, "event log unavailable");
            (
                Status::unavailable(format!(
                    "database unavailable; resume with after_cursor={after}"
                )),
                after,
            )
        }
    };
    if let Ok(value) = after.to_string().parse() {
        status
            .metadata_mut()
            .insert(kairos_proto::wire::RESUME_TRAILER, value);
    }
    status
}

#[tonic::async_trait]
impl SchedulerService for SchedulerApi {
    type SubscribeStream = SubscribeStream;

    #[instrument(skip_all)]
    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let subscription = convert::subscription(request.into_inner())?;
        let (events, start) = self.events.subscribe(subscription).await?;
        let stream = events.map(|item| match item {
            Ok(event) => Ok(pb::SubscribeResponse {
                event: Some(event.into()),
            }),
            Err(end) => Err(end_status(end)),
        });
        let mut response = Response::new(Box::pin(stream) as Self::SubscribeStream);
        // The cursor the stream starts after, so that even a subscriber that
        // sees no event before the stream breaks can resume without a gap.
        if let Ok(value) = start.to_string().parse() {
            response
                .metadata_mut()
                .insert(kairos_proto::wire::RESUME_TRAILER, value);
        }
        Ok(response)
    }

    #[instrument(skip_all)]
    async fn schedule(
        &self,
        request: Request<pb::ScheduleRequest>,
    ) -> Result<Response<pb::ScheduleResponse>, Status> {
        let spec = ScheduleSpec::try_from(request.into_inner()).map_err(AppError::from)?;
        let task = self.tasks.schedule(spec).await?;
        Ok(Response::new(pb::ScheduleResponse {
            task: Some(task.into()),
        }))
    }

    #[instrument(skip_all)]
    async fn schedule_batch(
        &self,
        request: Request<pb::ScheduleBatchRequest>,
    ) -> Result<Response<pb::ScheduleBatchResponse>, Status> {
        let items = request.into_inner().tasks;
        if items.is_empty() || items.len() > MAX_BATCH {
            let reason = format!("must hold 1 to {MAX_BATCH} tasks, got {}", items.len());
            return Err(AppError::from(ValidationError::invalid("tasks", reason)).into());
        }
        let specs = items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                ScheduleSpec::try_from(item).map_err(|mut e| {
                    e.field = format!("tasks[{i}].{}", e.field);
                    e
                })
            })
            .collect();
        let results = self.tasks.schedule_batch(specs).await?;
        log_unavailable_items(&results);
        let results = results
            .into_iter()
            .map(|r| pb::ScheduleBatchResult {
                result: Some(match r {
                    Ok(task) => pb::schedule_batch_result::Result::Task(task.into()),
                    Err(err) => pb::schedule_batch_result::Result::Error(item_error(err)),
                }),
            })
            .collect();
        Ok(Response::new(pb::ScheduleBatchResponse { results }))
    }

    #[instrument(skip_all)]
    async fn cancel(
        &self,
        request: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        let id = convert::task_id("id", &request.into_inner().id)?;
        let task = self.tasks.cancel(id).await?;
        Ok(Response::new(pb::CancelResponse {
            task: Some(task.into()),
        }))
    }

    #[instrument(skip_all)]
    async fn retry_task(
        &self,
        request: Request<pb::RetryTaskRequest>,
    ) -> Result<Response<pb::RetryTaskResponse>, Status> {
        let request = request.into_inner();
        if !request.id.is_empty() {
            let id = convert::task_id("id", &request.id)?;
            let task = self.tasks.retry(id).await?;
            return Ok(Response::new(pb::RetryTaskResponse {
                tasks: vec![task.into()],
                skipped: Default::default(),
            }));
        }
        let filter = convert::dead_filter(&request)?;
        let (retried, skipped) = self
            .tasks
            .retry_dead(&filter.queue, filter.contains.as_deref(), filter.limit)
            .await?;
        Ok(Response::new(pb::RetryTaskResponse {
            tasks: retried.into_iter().map(Into::into).collect(),
            skipped: skipped
                .into_iter()
                .map(|(id, reason)| (id.to_string(), reason))
                .collect(),
        }))
    }

    #[instrument(skip_all)]
    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::GetTaskResponse>, Status> {
        let id = convert::task_id("id", &request.into_inner().id)?;
        let detail = self.tasks.get(id).await?;
        Ok(Response::new(detail.into()))
    }

    #[instrument(skip_all)]
    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let filter = convert::task_filter(request.into_inner())?;
        let page = self.tasks.list(filter).await?;
        Ok(Response::new(page.into()))
    }

    #[instrument(skip_all)]
    async fn preview_recurring(
        &self,
        request: Request<pb::PreviewRecurringRequest>,
    ) -> Result<Response<pb::PreviewRecurringResponse>, Status> {
        let query = convert::preview_query(request.into_inner()).map_err(AppError::from)?;
        let times = self.recurring.preview(&query)?;
        Ok(Response::new(pb::PreviewRecurringResponse {
            fire_times: times.into_iter().map(convert::timestamp).collect(),
        }))
    }

    #[instrument(skip_all)]
    async fn create_recurring(
        &self,
        request: Request<pb::CreateRecurringRequest>,
    ) -> Result<Response<pb::CreateRecurringResponse>, Status> {
        let spec = RecurringSpec::try_from(request.into_inner()).map_err(AppError::from)?;
        let schedule = self.recurring.create(spec).await?;
        Ok(Response::new(pb::CreateRecurringResponse {
            schedule: Some(schedule.into()),
        }))
    }

    #[instrument(skip_all)]
    async fn get_recurring(
        &self,
        request: Request<pb::GetRecurringRequest>,
    ) -> Result<Response<pb::GetRecurringResponse>, Status> {
        let id = convert::task_id("id", &request.into_inner().id)?;
        let schedule = self.recurring.get(id).await?;
        Ok(Response::new(pb::GetRecurringResponse {
            schedule: Some(schedule.into()),
        }))
    }

    #[instrument(skip_all)]
    async fn list_recurring(
        &self,
        request: Request<pb::ListRecurringRequest>,
    ) -> Result<Response<pb::ListRecurringResponse>, Status> {
        let filter = convert::schedule_filter(request.into_inner())?;
        let page = self.recurring.list(filter).await?;
        Ok(Response::new(page.into()))
    }

    #[instrument(skip_all)]
    async fn update_recurring(
        &self,
        request: Request<pb::UpdateRecurringRequest>,
    ) -> Result<Response<pb::UpdateRecurringResponse>, Status> {
        let request = request.into_inner();
        let id = convert::task_id("id", &request.id)?;
        let mask = request.update_mask.map(|m| m.paths).unwrap_or_default();
        let changes = RecurringSpec::try_from(request.schedule.unwrap_or_default())
            .map_err(AppError::from)?;
        let schedule = self.recurring.update(id, changes, &mask).await?;
        Ok(Response::new(pb::UpdateRecurringResponse {
            schedule: Some(schedule.into()),
        }))
    }

    #[instrument(skip_all)]
    async fn pause_recurring(
        &self,
        request: Request<pb::PauseRecurringRequest>,
    ) -> Result<Response<pb::PauseRecurringResponse>, Status> {
        let id = convert::task_id("id", &request.into_inner().id)?;
        let schedule = self.recurring.pause(id).await?;
        Ok(Response::new(pb::PauseRecurringResponse {
            schedule: Some(schedule.into()),
        }))
    }

    #[instrument(skip_all)]
    async fn resume_recurring(
        &self,
        request: Request<pb::ResumeRecurringRequest>,
    ) -> Result<Response<pb::ResumeRecurringResponse>, Status> {
        let id = convert::task_id("id", &request.into_inner().id)?;
        let schedule = self.recurring.resume(id).await?;
        Ok(Response::new(pb::ResumeRecurringResponse {
            schedule: Some(schedule.into()),
        }))
    }

    #[instrument(skip_all)]
    async fn delete_recurring(
        &self,
        request: Request<pb::DeleteRecurringRequest>,
    ) -> Result<Response<pb::DeleteRecurringResponse>, Status> {
        let request = request.into_inner();
        let id = convert::task_id("id", &request.id)?;
        let cancelled = self.recurring.delete(id, request.cancel_pending).await?;
        Ok(Response::new(pb::DeleteRecurringResponse { cancelled }))
    }
}

//! `kairos.v1.StatusService/Report`: one bidirectional stream per worker.
//! Each request is handled concurrently and answered by its seq once recorded.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use kairos_proto::v1 as pb;
use kairos_proto::v1::status_service_server::StatusService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use super::convert;
use crate::app::{ReportService, StartOutcome};

/// Stream of answers to one worker.
pub(crate) type ReportStream =
    Pin<Box<dyn Stream<Item = Result<pb::ReportResponse, Status>> + Send>>;

/// The StatusService implementation.
#[derive(Debug, Clone)]
pub struct StatusApi {
    reports: ReportService,
    shutdown: CancellationToken,
}

impl StatusApi {
    /// Creates the API over the report use cases; streams end on `shutdown`.
    pub fn new(reports: ReportService, shutdown: CancellationToken) -> Self {
        Self { reports, shutdown }
    }
}

async fn answer(reports: ReportService, req: pb::ReportRequest) -> pb::ReportResponse {
    let mut response = pb::ReportResponse {
        seq: req.seq,
        ..Default::default()
    };
    let result = match req.event {
        Some(pb::report_request::Event::Started(started)) => reports
            .start(convert::attempt_start(req.worker_id, started))
            .await
            .map(|outcome| match outcome {
                StartOutcome::Run => response.decision = pb::StartDecision::Run.into(),
                StartOutcome::Skip(reason) => {
                    response.decision = pb::StartDecision::Skip.into();
                    response.reason = reason;
                }
            }),
        Some(pb::report_request::Event::Finished(finished)) => {
            match convert::attempt_end(req.worker_id, finished) {
                Ok(end) => reports.finish(end).await,
                Err(err) => Err(err.into()),
            }
        }
        None => Ok(()),
    };
    if let Err(err) = result {
        response.error = Status::from(err).message().to_owned();
    }
    response
}

#[tonic::async_trait]
impl StatusService for StatusApi {
    type ReportStream = ReportStream;

    async fn report(
        &self,
        request: Request<Streaming<pb::ReportRequest>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(1024);
        let reports = self.reports.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    () = shutdown.cancelled() => break,
                    next = incoming.next() => next,
                };
                let Some(Ok(req)) = next else { break };
                let (reports, tx) = (reports.clone(), tx.clone());
                tokio::spawn(async move {
                    let response = answer(reports, req).await;
                    // A closed stream means the worker went away; it resends on reconnect.
                    let _ = tx.send(Ok(response)).await;
                });
            }
            debug!("report stream ended");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

//! `kairos.v1.StatusService/Report`: one bidirectional stream per worker.
//! Requests that arrive together are decided as one batch, and each is
//! answered by its seq once recorded.

use std::pin::Pin;

use futures::{FutureExt as _, Stream, StreamExt};
use kairos_proto::v1 as pb;
use kairos_proto::v1::status_service_server::StatusService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use super::convert;
use crate::app::{AppError, ReportService, StartOutcome};

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

/// Most reports of one stream decided together (one Redis call for each kind).
const MAX_BATCH: usize = 512;

/// Answers a batch of one worker's reports: the starts with one claim call,
/// the results with another, both at once.
async fn answer_batch(
    reports: ReportService,
    batch: Vec<pb::ReportRequest>,
    tx: mpsc::Sender<Result<pb::ReportResponse, Status>>,
) {
    let response = |seq: u64| pb::ReportResponse {
        seq,
        ..Default::default()
    };
    let mut answers = Vec::with_capacity(batch.len());
    let (mut starts, mut start_seqs) = (Vec::new(), Vec::new());
    let (mut ends, mut end_seqs) = (Vec::new(), Vec::new());
    for req in batch {
        match req.event {
            Some(pb::report_request::Event::Started(started)) => {
                starts.push(convert::attempt_start(req.worker_id, started));
                start_seqs.push(req.seq);
            }
            Some(pb::report_request::Event::Finished(finished)) => {
                match convert::attempt_end(req.worker_id, finished) {
                    Ok(end) => {
                        ends.push(end);
                        end_seqs.push(req.seq);
                    }
                    Err(err) => answers.push(pb::ReportResponse {
                        error: Status::from(AppError::from(err)).message().to_owned(),
                        ..response(req.seq)
                    }),
                }
            }
            None => answers.push(response(req.seq)),
        }
    }
    let (started, finished) = tokio::join!(
        async {
            if starts.is_empty() {
                Ok(Vec::new())
            } else {
                reports.start(starts).await
            }
        },
        async {
            if ends.is_empty() {
                Ok(())
            } else {
                reports.finish(ends).await
            }
        },
    );
    let failed = |seq: u64, err: &AppError| pb::ReportResponse {
        error: err.to_string(),
        ..response(seq)
    };
    match started {
        Ok(outcomes) => {
            for (seq, outcome) in start_seqs.into_iter().zip(outcomes) {
                answers.push(match outcome {
                    StartOutcome::Run => pb::ReportResponse {
                        decision: pb::StartDecision::Run.into(),
                        ..response(seq)
                    },
                    StartOutcome::Skip(reason) => pb::ReportResponse {
                        decision: pb::StartDecision::Skip.into(),
                        reason,
                        ..response(seq)
                    },
                    StartOutcome::Wait { ms, reason } => pb::ReportResponse {
                        decision: pb::StartDecision::Wait.into(),
                        reason: reason.into(),
                        wait: Some(convert::ms_duration(ms)),
                        ..response(seq)
                    },
                });
            }
        }
        Err(err) => answers.extend(start_seqs.into_iter().map(|seq| failed(seq, &err))),
    }
    match finished {
        Ok(()) => answers.extend(end_seqs.into_iter().map(response)),
        Err(err) => answers.extend(end_seqs.into_iter().map(|seq| failed(seq, &err))),
    }
    for answer in answers {
        // A closed stream means the worker went away; it resends on reconnect.
        if tx.send(Ok(answer)).await.is_err() {
            break;
        }
    }
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
                let Some(Ok(first)) = next else { break };
                // Whatever else this worker already sent is decided with it.
                let mut batch = vec![first];
                let mut ended = false;
                while batch.len() < MAX_BATCH {
                    match incoming.next().now_or_never() {
                        Some(Some(Ok(req))) => batch.push(req),
                        Some(_) => {
                            ended = true;
                            break;
                        }
                        None => break,
                    }
                }
                tokio::spawn(answer_batch(reports.clone(), batch, tx.clone()));
                if ended {
                    break;
                }
            }
            debug!("report stream ended");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

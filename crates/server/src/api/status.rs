//! `kairos.v1.StatusService/Report`: one bidirectional stream per worker.
//! Reports that arrive together are decided as one batch, and each is
//! answered by its seq: a start once decided, a result once recorded; one
//! message per report that came alone, one message for the starts and one
//! for the results that came in a message's `reports`.

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

/// One report as the server decides it, whichever form it came in.
struct Item {
    seq: u64,
    event: Option<pb::report::Event>,
    /// Sent in a message's `reports`: answered in a message's `answers`.
    batched: bool,
}

/// Adds the reports of one message to `items`, and keeps the worker's name
/// when the message gives one.
fn unpack(req: pb::ReportRequest, worker_id: &mut String, items: &mut Vec<Item>) {
    let pb::ReportRequest {
        seq,
        worker_id: name,
        event,
        reports,
    } = req;
    if !name.is_empty() {
        *worker_id = name;
    }
    if reports.is_empty() {
        items.push(Item {
            seq,
            event: event.map(Into::into),
            batched: false,
        });
    } else {
        items.extend(reports.into_iter().map(|r| Item {
            seq: r.seq,
            event: r.event,
            batched: true,
        }));
    }
}

/// Where an answer goes: (sent in `reports`, the answer); the answer
/// carries its report's seq and nothing else yet.
fn answer(tag: (u64, bool)) -> (bool, pb::ReportResponse) {
    let (seq, batched) = tag;
    let answer = pb::ReportResponse {
        seq,
        ..Default::default()
    };
    (batched, answer)
}

/// The answer to a report the server could not record: the worker sends it again.
fn failed(tag: (u64, bool), err: &AppError) -> (bool, pb::ReportResponse) {
    let (batched, mut failed) = answer(tag);
    failed.error = err.to_string();
    (batched, failed)
}

/// The answer to a start, with its decision.
fn decided((tag, outcome): ((u64, bool), StartOutcome)) -> (bool, pb::ReportResponse) {
    let (batched, mut decided) = answer(tag);
    match outcome {
        StartOutcome::Run => decided.decision = pb::StartDecision::Run.into(),
        StartOutcome::Skip(reason) => {
            decided.decision = pb::StartDecision::Skip.into();
            decided.reason = reason;
        }
        StartOutcome::Wait { ms, reason } => {
            decided.decision = pb::StartDecision::Wait.into();
            decided.reason = reason.into();
            decided.wait = Some(convert::ms_duration(ms));
        }
    }
    (batched, decided)
}

/// Answers a batch of one worker's reports: the starts with one claim call,
/// the results with another, both at once. The starts are answered as soon
/// as they are decided: a result waits for its SQL commit, and a start that
/// waited with it would hold the worker's run slot for that long.
async fn answer_batch(
    reports: ReportService,
    worker_id: String,
    batch: Vec<Item>,
    tx: mpsc::Sender<Result<pb::ReportResponse, Status>>,
) {
    // Answers that need no backend go out with the starts'.
    let mut early = Vec::new();
    let (mut starts, mut start_items) = (Vec::new(), Vec::new());
    let (mut ends, mut end_items) = (Vec::new(), Vec::new());
    for item in batch {
        let tag = (item.seq, item.batched);
        match item.event {
            Some(pb::report::Event::Started(started)) => {
                starts.push(convert::attempt_start(worker_id.clone(), started));
                start_items.push(tag);
            }
            Some(pb::report::Event::Finished(finished)) => {
                match convert::attempt_end(worker_id.clone(), finished) {
                    Ok(end) => {
                        ends.push(end);
                        end_items.push(tag);
                    }
                    Err(err) => {
                        let (batched, mut refused) = answer(tag);
                        refused.error = Status::from(AppError::from(err)).message().to_owned();
                        early.push((batched, refused));
                    }
                }
            }
            None => early.push(answer(tag)),
        }
    }
    let started = async {
        if !starts.is_empty() {
            match reports.start(starts).await {
                Ok(outcomes) => early.extend(start_items.into_iter().zip(outcomes).map(decided)),
                Err(err) => early.extend(start_items.into_iter().map(|tag| failed(tag, &err))),
            }
        }
        send_answers(&tx, early).await;
    };
    let finished = async {
        if ends.is_empty() {
            return;
        }
        let answers: Vec<_> = match reports.finish(ends).await {
            Ok(()) => end_items.into_iter().map(answer).collect(),
            Err(err) => end_items.into_iter().map(|tag| failed(tag, &err)).collect(),
        };
        send_answers(&tx, answers).await;
    };
    tokio::join!(started, finished);
}

/// Sends answers in the form their reports came in: those that came in
/// `reports` together in one message, each of the others alone.
async fn send_answers(
    tx: &mpsc::Sender<Result<pb::ReportResponse, Status>>,
    answers: Vec<(bool, pb::ReportResponse)>,
) {
    let mut together = Vec::new();
    let mut messages = Vec::new();
    for (batched, answer) in answers {
        if batched {
            together.push(answer);
        } else {
            messages.push(answer);
        }
    }
    if !together.is_empty() {
        messages.push(pb::ReportResponse {
            answers: together,
            ..Default::default()
        });
    }
    for message in messages {
        // A closed stream means the worker went away; it resends on reconnect.
        if tx.send(Ok(message)).await.is_err() {
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
            // A worker may name itself only in its stream's first message.
            let mut worker_id = String::new();
            loop {
                let next = tokio::select! {
                    () = shutdown.cancelled() => break,
                    next = incoming.next() => next,
                };
                let Some(Ok(first)) = next else { break };
                // Whatever else this worker already sent is decided with it.
                let mut batch = Vec::new();
                unpack(first, &mut worker_id, &mut batch);
                let mut ended = false;
                while batch.len() < MAX_BATCH {
                    match incoming.next().now_or_never() {
                        Some(Some(Ok(req))) => unpack(req, &mut worker_id, &mut batch),
                        Some(_) => {
                            ended = true;
                            break;
                        }
                        None => break,
                    }
                }
                tokio::spawn(answer_batch(
                    reports.clone(),
                    worker_id.clone(),
                    batch,
                    tx.clone(),
                ));
                if ended {
                    break;
                }
            }
            debug!("report stream ended");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

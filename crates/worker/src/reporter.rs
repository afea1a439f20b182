//! The worker's side of `StatusService/Report`: one long-lived stream; every
//! report waits for the server's answer, and a report not yet answered when
//! the stream breaks is sent again on the next one, so no result is lost when
//! the server restarts. Reports ready at the same time go in one message,
//! and the server answers its starts in one and its results in another.

use std::collections::VecDeque;
use std::time::Duration;

use kairos_proto::v1 as pb;
use kairos_proto::v1::status_service_client::StatusServiceClient;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tracing::{debug, warn};

type Reply = oneshot::Sender<pb::ReportResponse>;

/// Most reports sent in one message.
const MAX_REPORTS: usize = 256;

/// Handle used by running tasks to talk to the server.
#[derive(Debug, Clone)]
pub(crate) struct Reporter {
    tx: mpsc::Sender<(pb::report::Event, Reply)>,
}

/// The reporter task stopped before answering (hard shutdown).
#[derive(Debug)]
pub(crate) struct ReporterGone;

impl Reporter {
    /// Starts the reporter task. It runs until every handle is dropped and all
    /// messages are answered, or until `abort` fires.
    pub(crate) fn spawn(
        endpoint: Endpoint,
        worker_id: String,
        abort: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(1024);
        let handle = tokio::spawn(run(endpoint, worker_id, rx, abort));
        (Self { tx }, handle)
    }

    /// Sends one message and waits until the server has recorded it.
    pub(crate) async fn send(
        &self,
        event: pb::report::Event,
    ) -> Result<pb::ReportResponse, ReporterGone> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((event, reply))
            .await
            .map_err(|_| ReporterGone)?;
        answer.await.map_err(|_| ReporterGone)
    }
}

/// Sends reports on one stream in the form its server reads.
struct Outbox {
    tx: mpsc::Sender<pb::ReportRequest>,
    worker_id: String,
    /// The worker's name went out on this stream: the server keeps it.
    named: bool,
    /// The server reads `reports`; false once it answered as an older one does.
    together: bool,
}

impl Outbox {
    /// Sends `reports`: in one message, or one message each to an older server.
    async fn send(&mut self, reports: Vec<pb::Report>) {
        if self.together {
            let worker_id = if self.named {
                String::new()
            } else {
                self.worker_id.clone()
            };
            self.named = true;
            let message = pb::ReportRequest {
                worker_id,
                reports,
                ..Default::default()
            };
            let _ = self.tx.send(message).await;
            return;
        }
        for report in reports {
            let message = pb::ReportRequest {
                seq: report.seq,
                worker_id: self.worker_id.clone(),
                event: report.event.map(Into::into),
                ..Default::default()
            };
            let _ = self.tx.send(message).await;
        }
    }
}

/// The reports not answered yet, in the order they were first sent.
fn unanswered(inflight: &InFlights) -> Vec<pb::Report> {
    inflight
        .iter()
        .map(|(seq, item)| pb::Report {
            seq,
            event: Some(item.event.clone()),
        })
        .collect()
}

struct InFlight {
    event: pb::report::Event,
    reply: Reply,
}

/// The reports sent and not answered yet, by seq. Seqs are handed out in
/// order and answered nearly in order, so a window over them is kept: a
/// hash map of a burst's tens of thousands of results awaiting their commit
/// cost the worker about a tenth of its CPU in cache misses (BENCHMARKS
/// item 57). An answered report leaves a hole until those before it are
/// answered too; the server answers every report, an error included, within
/// seconds, so holes do not pile up.
struct InFlights {
    /// Seq of `slots[0]`; the next seq handed out is `first + slots`.
    first: u64,
    /// Never starts with a hole, so it is empty once every report is answered.
    slots: VecDeque<Option<InFlight>>,
}

impl InFlights {
    /// An empty window whose first report gets seq 1 (0 is no report).
    fn new() -> Self {
        Self {
            first: 1,
            slots: VecDeque::new(),
        }
    }

    /// Adds a report and returns the seq it gets: the next in order.
    fn push(&mut self, item: InFlight) -> u64 {
        self.slots.push_back(Some(item));
        self.first + self.slots.len() as u64 - 1
    }

    fn get(&self, seq: u64) -> Option<&InFlight> {
        let at = usize::try_from(seq.checked_sub(self.first)?).ok()?;
        self.slots.get(at)?.as_ref()
    }

    /// Takes the report `seq` out; `None` if it was answered already or never sent.
    fn remove(&mut self, seq: u64) -> Option<InFlight> {
        let at = usize::try_from(seq.checked_sub(self.first)?).ok()?;
        let item = self.slots.get_mut(at)?.take()?;
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
            self.first += 1;
        }
        Some(item)
    }

    /// How many reports wait for an answer (counted: only logged).
    fn len(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The reports in seq order.
    fn iter(&self) -> impl Iterator<Item = (u64, &InFlight)> {
        (self.first..)
            .zip(&self.slots)
            .filter_map(|(seq, slot)| slot.as_ref().map(|item| (seq, item)))
    }
}

async fn run(
    endpoint: Endpoint,
    worker_id: String,
    mut rx: mpsc::Receiver<(pb::report::Event, Reply)>,
    abort: CancellationToken,
) {
    let mut inflight = InFlights::new();
    let mut accepting = true;
    let mut backoff = Duration::from_millis(100);
    // Messages the server could not record (a backend down) come back here after a pause.
    let (retry_tx, mut retry_rx) = mpsc::channel::<u64>(1024);
    loop {
        // While disconnected, keep taking new messages (they go out on the
        // next stream) and notice when the worker is done with us.
        let channel = loop {
            if !accepting && inflight.is_empty() {
                return;
            }
            tokio::select! {
                () = abort.cancelled() => return,
                next = rx.recv(), if accepting => match next {
                    Some((event, reply)) => {
                        inflight.push(InFlight { event, reply });
                    }
                    None => accepting = false,
                },
                connected = endpoint.connect() => match connected {
                    Ok(channel) => break channel,
                    Err(err) => {
                        debug!(error = %err, "cannot reach kairos-server; retrying");
                        tokio::select! {
                            () = abort.cancelled() => return,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                },
            }
        };
        let (out_tx, out_rx) = mpsc::channel::<pb::ReportRequest>(4096);
        let mut client = StatusServiceClient::new(channel);
        let mut answers = match client.report(ReceiverStream::new(out_rx)).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                debug!(%status, "report stream refused; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        let mut outbox = Outbox {
            tx: out_tx,
            worker_id: worker_id.clone(),
            named: false,
            together: true,
        };
        let report = |seq: u64, event: &pb::report::Event| pb::Report {
            seq,
            event: Some(event.clone()),
        };
        for reports in unanswered(&inflight).chunks(MAX_REPORTS) {
            outbox.send(reports.to_vec()).await;
        }
        loop {
            tokio::select! {
                () = abort.cancelled() => return,
                next = rx.recv(), if accepting => match next {
                    Some(first) => {
                        // Tasks woken by the same answer report at about the
                        // same time: let them run first, so that their
                        // reports go in this message.
                        tokio::task::yield_now().await;
                        let mut reports = Vec::new();
                        let mut next = Some(first);
                        while let Some((event, reply)) = next {
                            let sent = Some(event.clone());
                            let seq = inflight.push(InFlight { event, reply });
                            reports.push(pb::Report { seq, event: sent });
                            next = if reports.len() < MAX_REPORTS { rx.try_recv().ok() } else { None };
                        }
                        outbox.send(reports).await;
                    }
                    None => accepting = false,
                },
                Some(seq) = retry_rx.recv() => {
                    if let Some(item) = inflight.get(seq) {
                        outbox.send(vec![report(seq, &item.event)]).await;
                    }
                }
                answer = answers.message() => match answer {
                    Ok(Some(answer)) if answer.seq == 0 && answer.answers.is_empty() => {
                        // A server older than this worker reads no `reports`:
                        // it answered nothing. Send everything again, alone.
                        if outbox.together {
                            warn!("kairos-server reads one report per message; upgrade it");
                            outbox.together = false;
                            outbox.send(unanswered(&inflight)).await;
                        }
                    }
                    Ok(Some(mut answer)) => {
                        let answers = std::mem::take(&mut answer.answers);
                        let mut retry = Vec::new();
                        for answer in answers.into_iter().chain((answer.seq != 0).then_some(answer)) {
                            if !answer.error.is_empty() {
                                warn!(seq = answer.seq, error = answer.error, "server could not record a report; retrying");
                                retry.push(answer.seq);
                            } else if let Some(item) = inflight.remove(answer.seq) {
                                let _ = item.reply.send(answer);
                            }
                        }
                        if !retry.is_empty() {
                            let retry_tx = retry_tx.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(Duration::from_secs(1)).await;
                                for seq in retry {
                                    let _ = retry_tx.send(seq).await;
                                }
                            });
                        }
                    }
                    Ok(None) | Err(_) => {
                        debug!(pending = inflight.len(), "report stream closed; reconnecting");
                        break;
                    }
                },
            }
            if !accepting && inflight.is_empty() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;

    use futures::{Stream, StreamExt as _};
    use kairos_proto::v1::status_service_server::{StatusService, StatusServiceServer};
    use tokio_stream::wrappers::TcpListenerStream;

    use super::*;

    type Answers = Pin<Box<dyn Stream<Item = Result<pb::ReportResponse, tonic::Status>> + Send>>;

    /// Answers as a server from before `reports` did: it reads one report per
    /// message and answers it by its seq; `reports` it does not know.
    struct OlderServer;

    #[tonic::async_trait]
    impl StatusService for OlderServer {
        type ReportStream = Answers;

        async fn report(
            &self,
            request: tonic::Request<tonic::Streaming<pb::ReportRequest>>,
        ) -> Result<tonic::Response<Answers>, tonic::Status> {
            let answers = request.into_inner().map(|request| {
                let request = request?;
                let decision = match request.event {
                    Some(_) => pb::StartDecision::Run,
                    None => pb::StartDecision::Unspecified,
                };
                Ok(pb::ReportResponse {
                    seq: request.seq,
                    decision: decision.into(),
                    ..Default::default()
                })
            });
            Ok(tonic::Response::new(Box::pin(answers)))
        }
    }

    #[test]
    fn the_window_of_unanswered_reports_keeps_their_order_and_drops_answered_ones() {
        let mut inflight = InFlights::new();
        for seq in 1..=5 {
            let (reply, _) = oneshot::channel();
            let event = pb::report::Event::Started(pb::AttemptStarted {
                task_id: format!("t{seq}"),
                ..Default::default()
            });
            assert_eq!(inflight.push(InFlight { event, reply }), seq);
        }
        let seqs = |inflight: &InFlights| inflight.iter().map(|(s, _)| s).collect::<Vec<_>>();
        assert!(inflight.remove(3).is_some());
        assert_eq!((inflight.len(), seqs(&inflight)), (4, vec![1, 2, 4, 5]));
        assert!(inflight.remove(3).is_none(), "answered twice");
        assert!(inflight.get(3).is_none());
        assert!(inflight.remove(1).is_some());
        assert!(inflight.remove(2).is_some());
        // The holes before the oldest unanswered report are gone.
        assert_eq!((inflight.first, inflight.slots.len()), (4, 2));
        assert!(inflight.remove(0).is_none() && inflight.remove(99).is_none());
        let events = unanswered(&inflight);
        assert_eq!(events.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![4, 5]);
        assert!(matches!(
            inflight.get(5).map(|i| &i.event),
            Some(pb::report::Event::Started(s)) if s.task_id == "t5"
        ));
        assert!(inflight.remove(4).is_some() && inflight.remove(5).is_some());
        assert!(inflight.is_empty() && inflight.slots.is_empty());
    }

    #[tokio::test]
    async fn reports_go_one_per_message_to_an_older_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(StatusServiceServer::new(OlderServer))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        let endpoint = Endpoint::from_shared(format!("http://{addr}")).expect("endpoint");
        let (reporter, _task) = Reporter::spawn(endpoint, "w".into(), CancellationToken::new());
        let started = |id: &str| {
            pb::report::Event::Started(pb::AttemptStarted {
                task_id: id.into(),
                attempt: 1,
                ..Default::default()
            })
        };
        let answers = tokio::time::timeout(Duration::from_secs(10), async {
            futures::future::join_all(["a", "b", "c"].map(|id| reporter.send(started(id)))).await
        })
        .await
        .expect("every report answered");
        for answer in answers {
            let answer = answer.expect("reporter running");
            assert_eq!(answer.decision, i32::from(pb::StartDecision::Run));
        }
    }
}

//! The worker's side of `StatusService/Report`: one long-lived stream; every
//! message waits for the server's answer, and a message not yet answered when
//! the stream breaks is sent again on the next one, so no result is lost when
//! the server restarts.

use std::collections::HashMap;
use std::time::Duration;

use kairos_proto::v1 as pb;
use kairos_proto::v1::status_service_client::StatusServiceClient;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tracing::{debug, warn};

type Reply = oneshot::Sender<pb::ReportResponse>;

/// Handle used by running tasks to talk to the server.
#[derive(Debug, Clone)]
pub(crate) struct Reporter {
    tx: mpsc::Sender<(pb::report_request::Event, Reply)>,
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
        event: pb::report_request::Event,
    ) -> Result<pb::ReportResponse, ReporterGone> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((event, reply))
            .await
            .map_err(|_| ReporterGone)?;
        answer.await.map_err(|_| ReporterGone)
    }
}

struct InFlight {
    event: pb::report_request::Event,
    reply: Reply,
}

async fn run(
    endpoint: Endpoint,
    worker_id: String,
    mut rx: mpsc::Receiver<(pb::report_request::Event, Reply)>,
    abort: CancellationToken,
) {
    let mut inflight: HashMap<u64, InFlight> = HashMap::new();
    let mut next_seq: u64 = 1;
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
                        inflight.insert(next_seq, InFlight { event, reply });
                        next_seq += 1;
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
        let request = |seq: u64, event: &pb::report_request::Event| pb::ReportRequest {
            seq,
            worker_id: worker_id.clone(),
            event: Some(event.clone()),
        };
        let mut resend: Vec<u64> = inflight.keys().copied().collect();
        resend.sort_unstable();
        for seq in resend {
            let _ = out_tx.send(request(seq, &inflight[&seq].event)).await;
        }
        loop {
            tokio::select! {
                () = abort.cancelled() => return,
                next = rx.recv(), if accepting => match next {
                    Some((event, reply)) => {
                        let seq = next_seq;
                        next_seq += 1;
                        let _ = out_tx.send(request(seq, &event)).await;
                        inflight.insert(seq, InFlight { event, reply });
                    }
                    None => accepting = false,
                },
                Some(seq) = retry_rx.recv() => {
                    if let Some(item) = inflight.get(&seq) {
                        let _ = out_tx.send(request(seq, &item.event)).await;
                    }
                }
                answer = answers.message() => match answer {
                    Ok(Some(answer)) if answer.error.is_empty() => {
                        if let Some(item) = inflight.remove(&answer.seq) {
                            let _ = item.reply.send(answer);
                        }
                    }
                    Ok(Some(answer)) => {
                        warn!(seq = answer.seq, error = answer.error, "server could not record a report; retrying");
                        let retry_tx = retry_tx.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            let _ = retry_tx.send(answer.seq).await;
                        });
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

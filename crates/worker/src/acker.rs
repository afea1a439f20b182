//! Settled deliveries are acknowledged from one task, so that those settled
//! by the same answer of the server reach NATS in one write.
//!
//! Each delivery is settled in a task of its own, and an acknowledgement
//! sent from there woke the NATS connection's task, which tokio then ran
//! next: one write, and one TCP segment for nats-server, per task
//! (BENCHMARKS item 57). Sent from here, after the other tasks woken with
//! the first have queued theirs, the connection writes them together.

use std::sync::Arc;

use async_nats::jetstream::{AckKind, Message};
use tokio::sync::mpsc;
use tracing::warn;

/// Most acknowledgements sent before the connection gets to write them.
const MAX_BATCH: usize = 512;

/// One acknowledgement to send: the delivery, how (`None`: a plain ack)
/// and its task's id for the log.
type Ack = (Arc<Message>, Option<AckKind>, String);

/// Handle that queues acknowledgements for the acker task.
#[derive(Debug, Clone)]
pub(crate) struct Acker {
    tx: mpsc::UnboundedSender<Ack>,
}

impl Acker {
    /// Starts the acker task; it ends once every handle is dropped and all
    /// it was given is sent.
    pub(crate) fn spawn() -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, tokio::spawn(run(rx)))
    }

    /// Queues the acknowledgement of `msg` (`kind` `None`: a plain ack).
    /// It is not awaited: a lost one only means a redelivery, which the
    /// start claim settles.
    pub(crate) fn ack(&self, msg: Arc<Message>, kind: Option<AckKind>, task_id: String) {
        // Unbounded, so that a settling task never waits here; what is
        // queued is bounded by the deliveries a worker holds.
        let _ = self.tx.send((msg, kind, task_id));
    }
}

async fn run(mut rx: mpsc::UnboundedReceiver<Ack>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        // Tasks woken by the same answer settle at about the same time:
        // let them run first, so that their acknowledgements go with this one.
        tokio::task::yield_now().await;
        batch.push(first);
        while batch.len() < MAX_BATCH
            && let Ok(next) = rx.try_recv()
        {
            batch.push(next);
        }
        for (msg, kind, task_id) in batch.drain(..) {
            let sent = match kind {
                None => msg.ack().await,
                Some(kind) => msg.ack_with(kind).await,
            };
            if let Err(err) = sent {
                warn!(task_id, error = %err, "acknowledgement failed; the task may be delivered again");
            }
        }
    }
}

//! Writes status changes to SQL in batches: many concurrent reports share one
//! transaction, which is what keeps SQLite fast under bursts.

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{AppError, AppResult};
use crate::bus::Bus;
use crate::domain::StatusWrite;
use crate::store::DynStore;

/// Most writes folded into one transaction.
const MAX_BATCH: usize = 1024;

type Waiter = oneshot::Sender<Result<(), String>>;

/// Handle to the recorder task. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Recorder {
    /// Writes someone waits for (a worker's start or result, a cancel).
    urgent: mpsc::Sender<(StatusWrite, Option<Waiter>)>,
    /// Informational writes (DISPATCHED); a burst of them must not delay the urgent ones.
    background: mpsc::Sender<(StatusWrite, Option<Waiter>)>,
}

impl Recorder {
    /// Starts the recorder; it flushes what is queued and stops once `shutdown`
    /// fires and every handle is gone.
    pub fn spawn(
        store: DynStore,
        bus: Bus,
        shutdown: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (urgent, urgent_rx) = mpsc::channel(16 * MAX_BATCH);
        let (background, background_rx) = mpsc::channel(16 * MAX_BATCH);
        let handle = tokio::spawn(run(store, bus, urgent_rx, background_rx, shutdown));
        (Self { urgent, background }, handle)
    }

    /// Records a change and waits until it is committed.
    pub async fn record(&self, write: StatusWrite) -> AppResult<()> {
        let (done, wait) = oneshot::channel();
        let closed = || AppError::Unavailable {
            backend: "recorder",
            cause: "shutting down".into(),
        };
        self.urgent
            .send((write, Some(done)))
            .await
            .map_err(|_| closed())?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(cause)) => Err(AppError::Unavailable {
                backend: "database",
                cause,
            }),
            Err(_) => Err(closed()),
        }
    }

    /// Queues a change ahead of informational ones without waiting for it.
    pub async fn record_soon(&self, write: StatusWrite) {
        if self.urgent.send((write, None)).await.is_err() {
            debug!("recorder closed, status change dropped");
        }
    }

    /// Records a change without waiting (status that is informational only).
    pub async fn record_later(&self, write: StatusWrite) {
        if self.background.send((write, None)).await.is_err() {
            debug!("recorder closed, status change dropped");
        }
    }
}

async fn run(
    store: DynStore,
    bus: Bus,
    mut urgent: mpsc::Receiver<(StatusWrite, Option<Waiter>)>,
    mut background: mpsc::Receiver<(StatusWrite, Option<Waiter>)>,
    shutdown: CancellationToken,
) {
    let mut writes = Vec::with_capacity(MAX_BATCH);
    let mut waiters = Vec::with_capacity(MAX_BATCH);
    let mut closing = false;
    loop {
        let first = if closing {
            // Take what is already queued, then stop.
            match urgent.try_recv() {
                Ok(item) => Some(item),
                Err(_) => background.try_recv().ok(),
            }
        } else {
            tokio::select! {
                biased;
                Some(item) = urgent.recv() => Some(item),
                Some(item) = background.recv() => Some(item),
                () = shutdown.cancelled() => {
                    urgent.close();
                    background.close();
                    closing = true;
                    continue;
                }
            }
        };
        let Some((write, waiter)) = first else { break };
        writes.push(write);
        waiters.extend(waiter);
        // Urgent writes first; background ones only fill what is left of the batch.
        for rx in [&mut urgent, &mut background] {
            while writes.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok((write, waiter)) => {
                        writes.push(write);
                        waiters.extend(waiter);
                    }
                    Err(_) => break,
                }
            }
        }
        let result = store.apply(&writes).await;
        match &result {
            Ok(()) => bus.signal_events().await,
            Err(err) => warn!(writes = writes.len(), error = %err, "status batch not recorded"),
        }
        let outcome = result.map_err(|e| e.to_string());
        for waiter in waiters.drain(..) {
            let _ = waiter.send(outcome.clone());
        }
        writes.clear();
    }
    debug!("recorder stopped");
}

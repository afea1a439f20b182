//! Group commit for new tasks: concurrent Schedule calls share one SQL
//! transaction, so single-task booking is not bounded by one commit (and,
//! on SQLite, one fsync) per task.

use tokio::sync::{mpsc, oneshot};

use super::{AppError, AppResult};
use crate::bus::Bus;
use crate::domain::NewTask;
use crate::store::{DynStore, InsertOutcome};

/// Most tasks folded into one transaction.
const MAX_GROUP: usize = 1000;

/// Tasks handed back with their outcomes, so the caller needs no copy of them.
type Inserted = Vec<(NewTask, InsertOutcome)>;

type Request = (
    Vec<NewTask>,
    Vec<i64>,
    oneshot::Sender<Result<Inserted, String>>,
);

/// Handle to the inserter task. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Inserter {
    tx: mpsc::Sender<Request>,
}

impl Inserter {
    /// Starts the inserter; it stops when every handle is gone.
    pub fn spawn(store: DynStore, bus: Bus) -> Self {
        let (tx, rx) = mpsc::channel(4 * MAX_GROUP);
        tokio::spawn(run(store, bus, rx));
        Self { tx }
    }

    /// Inserts tasks (with their buckets) in a transaction shared with
    /// whatever else is waiting; each task comes back with its outcome, in
    /// order.
    pub async fn insert(&self, tasks: Vec<NewTask>, buckets: Vec<i64>) -> AppResult<Inserted> {
        let (done, wait) = oneshot::channel();
        let gone = || AppError::Unavailable {
            backend: "database",
            cause: "inserter stopped".into(),
        };
        self.tx
            .send((tasks, buckets, done))
            .await
            .map_err(|_| gone())?;
        match wait.await {
            Ok(Ok(outcomes)) => Ok(outcomes),
            Ok(Err(cause)) => Err(AppError::Unavailable {
                backend: "database",
                cause,
            }),
            Err(_) => Err(gone()),
        }
    }
}

async fn run(store: DynStore, bus: Bus, mut rx: mpsc::Receiver<Request>) {
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        let mut size = group[0].0.len();
        while size < MAX_GROUP {
            match rx.try_recv() {
                Ok(request) => {
                    size += request.0.len();
                    group.push(request);
                }
                Err(_) => break,
            }
        }
        let mut tasks = Vec::with_capacity(size);
        let mut buckets = Vec::with_capacity(size);
        let mut callers = Vec::with_capacity(group.len());
        for (mut t, mut b, done) in group {
            callers.push((t.len(), done));
            tasks.append(&mut t);
            buckets.append(&mut b);
        }
        match store.insert_tasks(&tasks, &buckets).await {
            Ok(outcomes) => {
                bus.signal_events().await;
                let mut outcomes = tasks.into_iter().zip(outcomes);
                for (n, done) in callers {
                    let _ = done.send(Ok(outcomes.by_ref().take(n).collect()));
                }
            }
            Err(err) => {
                let cause = err.to_string();
                for (_, done) in callers {
                    let _ = done.send(Err(cause.clone()));
                }
            }
        }
    }
}

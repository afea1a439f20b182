//! Writes status changes to SQL in batches: many concurrent reports share one
//! transaction, which is what keeps SQLite fast under bursts. Where the store
//! allows it (Postgres), a batch begins as soon as the one before holds its
//! rows, so the two overlap; a task they share still changes in order.
//!
//! A DISPATCHED write waits up to `DISPATCHED_LINGER` before it is written:
//! a first start implies the release (the store logs both events), so when
//! the worker starts the task within that time the separate write is dropped.
//! In a burst that saves a task-row update and an event per task.
//!
//! A RUNNING write (nobody waits for it: the Redis claim decided the start)
//! waits up to `STARTED_LINGER` for the attempt's result. A result in that
//! time takes it along into its own batch, where the two collapse into one
//! task-row update and one run row; both events are still logged.
//!
//! The recorder takes writes from its channels while a batch commits, so a
//! start finds its release still lingering however far SQL is behind, and a
//! dispatcher sending releases never waits for SQL (BENCHMARKS item 52).

use std::collections::VecDeque;
use std::time::Duration;

// Keyed by task ids, hashed on every status write: a fast hasher.
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{AppError, AppResult};
use crate::bus::Bus;
use crate::domain::{StatusWrite, TaskId};
use crate::store::DynStore;

/// Most writes folded into one transaction.
const MAX_BATCH: usize = 1024;
/// How long a DISPATCHED write waits for the task's first start to imply it.
const DISPATCHED_LINGER: Duration = Duration::from_secs(2);
/// How long a RUNNING write waits for the attempt's result to share its batch.
const STARTED_LINGER: Duration = Duration::from_millis(50);
/// Most writes waiting in one linger; beyond it the oldest are written at once.
const MAX_LINGERING: usize = 200_000;
/// Most urgent writes taken from the channel and not yet in a batch. A start
/// sends its RUNNING write and waits only for room: in a burst, starts come
/// faster than SQL commits them, and a start waiting for that backlog would
/// keep its worker's run slot from the next task (BENCHMARKS item 47). The
/// backlog is worked off after the burst.
const MAX_QUEUED: usize = 256 * MAX_BATCH;
/// Most background writes (releases ahead, expiries) not yet in a batch.
const MAX_BACKGROUND: usize = 16 * MAX_BATCH;
/// Room in each channel: the recorder empties them into `Pending` and
/// `Lingering` while SQL is busy, so they only hand writes over.
const CHANNEL: usize = 4 * MAX_BATCH;

type Waiter = oneshot::Sender<Result<(), String>>;

/// How a write was sent, which decides whether the recorder may keep it back.
#[derive(Debug)]
enum Sent {
    /// Someone waits for the commit.
    Waited(Waiter),
    /// Nobody waits: a DISPATCHED or RUNNING write may linger (see `Lingering`).
    Later,
    /// Nobody waits, and it goes with the next batch.
    Plain,
}

/// A write on its way to the recorder.
type Item = (StatusWrite, Sent);

/// A write taken from a channel, with whoever waits for its commit.
type Queued = (StatusWrite, Option<Waiter>);

/// Handle to the recorder task. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Recorder {
    /// Writes someone waits for (a worker's start or result, a cancel).
    urgent: mpsc::Sender<Item>,
    /// Informational writes (DISPATCHED); a burst of them must not delay the urgent ones.
    background: mpsc::Sender<Item>,
}

impl Recorder {
    /// Starts the recorder; it flushes what is queued and stops once `shutdown`
    /// fires and every handle is gone.
    pub fn spawn(
        store: DynStore,
        bus: Bus,
        shutdown: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (urgent, urgent_rx) = mpsc::channel(CHANNEL);
        let (background, background_rx) = mpsc::channel(CHANNEL);
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
            .send((write, Sent::Waited(done)))
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
        if self.urgent.send((write, Sent::Later)).await.is_err() {
            debug!("recorder closed, status change dropped");
        }
    }

    /// Records a change without waiting (status that is informational only).
    pub async fn record_later(&self, write: StatusWrite) {
        if self.background.send((write, Sent::Later)).await.is_err() {
            debug!("recorder closed, status change dropped");
        }
    }

    /// Records the release of a task ahead of its due time, with the next
    /// batch: its start cannot come before the due time, so waiting for the
    /// start to imply it would only move the write to the due instant, where
    /// the burst's starts need the time.
    pub async fn record_ahead(&self, write: StatusWrite) {
        if self.background.send((write, Sent::Plain)).await.is_err() {
            debug!("recorder closed, status change dropped");
        }
    }
}

/// Writes kept back for a while, one per task, oldest first: DISPATCHED
/// writes until a first start implies them, RUNNING writes until their
/// result takes them along.
struct Lingering {
    linger: Duration,
    /// The write waiting, by task.
    waiting: HashMap<TaskId, StatusWrite>,
    /// Task ids in arrival order with their deadline; stale ids are skipped.
    order: VecDeque<(Instant, TaskId)>,
}

impl Lingering {
    fn new(linger: Duration) -> Self {
        Self {
            linger,
            waiting: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Keeps `write` back; returns the task's earlier waiting write, which
    /// is due now.
    fn add(&mut self, write: StatusWrite) -> Option<StatusWrite> {
        let id = write.task_id();
        let earlier = self.waiting.insert(id, write);
        if earlier.is_none() {
            self.order.push_back((Instant::now() + self.linger, id));
        }
        earlier
    }

    /// Takes the task's waiting write out.
    fn remove(&mut self, id: TaskId) -> Option<StatusWrite> {
        self.waiting.remove(&id)
    }

    /// Drops the waiting DISPATCHED write of a task whose first attempt
    /// started: the store logs the release that start implies.
    fn implied_by(&mut self, write: &StatusWrite) {
        if let StatusWrite::Started { id, attempt: 1, .. } = write {
            self.waiting.remove(id);
        }
    }

    /// When the oldest waiting write is due. Forgets the ids in front whose
    /// write already left (a start taken along by its result), so the
    /// recorder does not wake for them.
    fn next_deadline(&mut self) -> Option<Instant> {
        while let Some((_, id)) = self.order.front()
            && !self.waiting.contains_key(id)
        {
            self.order.pop_front();
        }
        self.order.front().map(|(deadline, _)| *deadline)
    }

    /// Moves into `writes` those past their deadline (all of them with
    /// `everything`), and the oldest beyond MAX_LINGERING, up to MAX_BATCH.
    fn take_due(&mut self, writes: &mut Vec<StatusWrite>, everything: bool) {
        let now = Instant::now();
        while writes.len() < MAX_BATCH {
            let Some(&(deadline, id)) = self.order.front() else {
                break;
            };
            let due = everything || deadline <= now || self.waiting.len() > MAX_LINGERING;
            if !due {
                break;
            }
            self.order.pop_front();
            if let Some(write) = self.waiting.remove(&id) {
                writes.push(write);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    fn len(&self) -> usize {
        self.waiting.len()
    }
}

/// Tasks whose first attempt started lately. The dispatcher records a round's
/// releases once the whole round is published, and workers often start a
/// task before that: its DISPATCHED write then arrives implied already, and
/// would cost a task-row lookup for nothing.
struct Begun {
    ids: HashSet<TaskId>,
    /// Ids in arrival order with the time they are forgotten.
    order: VecDeque<(Instant, TaskId)>,
}

impl Begun {
    fn new() -> Self {
        Self {
            ids: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    /// Remembers a first start for as long as a DISPATCHED write may linger.
    fn note(&mut self, write: &StatusWrite) {
        if let StatusWrite::Started { id, attempt: 1, .. } = write {
            let now = Instant::now();
            while let Some(&(until, old)) = self.order.front()
                && (until <= now || self.order.len() >= MAX_LINGERING)
            {
                self.order.pop_front();
                self.ids.remove(&old);
            }
            if self.ids.insert(*id) {
                self.order.push_back((now + DISPATCHED_LINGER, *id));
            }
        }
    }

    /// Tells whether a DISPATCHED write for `id` came after its first start.
    fn implies(&self, id: TaskId) -> bool {
        self.ids.contains(&id)
    }
}

/// The writes the recorder keeps back, by kind.
struct KeptBack {
    dispatched: Lingering,
    started: Lingering,
    begun: Begun,
}

impl Default for KeptBack {
    fn default() -> Self {
        Self {
            dispatched: Lingering::new(DISPATCHED_LINGER),
            started: Lingering::new(STARTED_LINGER),
            begun: Begun::new(),
        }
    }
}

impl KeptBack {
    /// A first start implies its release: drops the DISPATCHED write waiting,
    /// and remembers the start for one that comes later.
    fn note_start(&mut self, write: &StatusWrite) {
        self.dispatched.implied_by(write);
        self.begun.note(write);
    }

    fn next_deadline(&mut self) -> Option<Instant> {
        match (
            self.dispatched.next_deadline(),
            self.started.next_deadline(),
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn take_due(&mut self, writes: &mut Vec<StatusWrite>, everything: bool) {
        self.started.take_due(writes, everything);
        self.dispatched.take_due(writes, everything);
    }

    fn is_empty(&self) -> bool {
        self.dispatched.is_empty() && self.started.is_empty()
    }
}

/// Writes taken from the channels and not yet in a batch, by priority, each
/// with whoever waits for its commit.
#[derive(Default)]
struct Pending {
    /// From the urgent channel.
    soon: VecDeque<Queued>,
    /// From the background channel.
    later: VecDeque<Queued>,
}

impl Pending {
    /// Takes up to MAX_BATCH writes, urgent ones first; background ones only
    /// fill what is left.
    fn next_batch(&mut self, writes: &mut Vec<StatusWrite>, waiters: &mut Vec<Waiter>) {
        for queue in [&mut self.soon, &mut self.later] {
            while writes.len() < MAX_BATCH
                && let Some((write, waiter)) = queue.pop_front()
            {
                writes.push(write);
                waiters.extend(waiter);
            }
        }
    }
}

/// Queues `first` and whatever else waits on its channel, up to MAX_BATCH.
fn receive(
    first: Item,
    rx: &mut mpsc::Receiver<Item>,
    queue: &mut VecDeque<Queued>,
    lingering: &mut KeptBack,
) {
    take(first, queue, lingering);
    for _ in 1..MAX_BATCH {
        match rx.try_recv() {
            Ok(item) => take(item, queue, lingering),
            Err(_) => break,
        }
    }
}

async fn run(
    store: DynStore,
    bus: Bus,
    mut urgent: mpsc::Receiver<Item>,
    mut background: mpsc::Receiver<Item>,
    shutdown: CancellationToken,
) {
    let mut pending = Pending::default();
    let mut lingering = KeptBack::default();
    let mut closing = false;
    let (mut urgent_open, mut background_open) = (true, true);
    let at_once = store.batches_at_once().max(1);
    let mut applying = futures::stream::FuturesUnordered::new();
    // The batch begun last, until it holds its rows.
    let mut holding: Option<oneshot::Receiver<()>> = None;
    // Filled and handed over whole, so a wake with nothing to write allocates nothing.
    let mut writes = Vec::with_capacity(MAX_BATCH);
    let mut waiters = Vec::new();
    loop {
        // The next batch begins once the one before holds its rows, so a
        // task's changes still apply in the order they came.
        let may_begin = holding.is_none() && applying.len() < at_once;
        if may_begin {
            pending.next_batch(&mut writes, &mut waiters);
            lingering.take_due(&mut writes, closing);
            if !writes.is_empty() {
                let (held, rows_held) = oneshot::channel();
                applying.push(tokio::spawn(apply(
                    store.clone(),
                    bus.clone(),
                    std::mem::replace(&mut writes, Vec::with_capacity(MAX_BATCH)),
                    std::mem::take(&mut waiters),
                    held,
                )));
                holding = Some(rows_held);
                continue;
            }
            if closing && !urgent_open && !background_open && lingering.is_empty() {
                break;
            }
        }
        let deadline = lingering.next_deadline().filter(|_| may_begin);
        // Writes are taken from the channels while SQL is busy, so a start
        // drops its lingering release at once, however far SQL is behind:
        // the bound on what waits is here, not in the channels.
        let urgent_room = urgent_open && pending.soon.len() < MAX_QUEUED;
        let background_room = background_open
            && pending.later.len() < MAX_BACKGROUND
            && lingering.dispatched.len() < MAX_LINGERING;
        tokio::select! {
            biased;
            () = shutdown.cancelled(), if !closing => {
                urgent.close();
                background.close();
                closing = true;
            }
            _ = async { holding.as_mut().expect("guarded").await }, if holding.is_some() => {
                // Sent, or dropped by a batch that failed: either way its turn is over.
                holding = None;
            }
            Some(_) = applying.next(), if !applying.is_empty() => {}
            item = urgent.recv(), if urgent_room => match item {
                Some(item) => receive(item, &mut urgent, &mut pending.soon, &mut lingering),
                None => urgent_open = false,
            },
            item = background.recv(), if background_room => match item {
                Some(item) => receive(item, &mut background, &mut pending.later, &mut lingering),
                None => background_open = false,
            },
            () = async {
                match deadline {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => futures::future::pending().await,
                }
            } => {}
        }
    }
    while applying.next().await.is_some() {}
    debug!("recorder stopped");
}

/// Applies one batch and tells everyone waiting for it how it went.
async fn apply(
    store: DynStore,
    bus: Bus,
    writes: Vec<StatusWrite>,
    waiters: Vec<Waiter>,
    held: oneshot::Sender<()>,
) {
    let result = store.apply_in_turn(&writes, Some(held)).await;
    match &result {
        Ok(()) => bus.signal_events().await,
        Err(err) => warn!(writes = writes.len(), error = %err, "status batch not recorded"),
    }
    let outcome = result.map_err(|e| e.to_string());
    for waiter in waiters {
        let _ = waiter.send(outcome.clone());
    }
}

/// Queues one write for a batch, or keeps it back (see `Lingering`).
fn take((write, sent): Item, queue: &mut VecDeque<Queued>, lingering: &mut KeptBack) {
    match (&write, sent) {
        // Its first start came already and logged the release.
        (StatusWrite::Dispatched { id, .. }, Sent::Later | Sent::Plain)
            if lingering.begun.implies(*id) => {}
        (StatusWrite::Dispatched { .. }, Sent::Later) => {
            // A release sent again replaces the one waiting.
            let _ = lingering.dispatched.add(write);
        }
        (StatusWrite::Started { .. }, Sent::Later) => {
            lingering.note_start(&write);
            queue.extend(lingering.started.add(write).map(|w| (w, None)));
        }
        (_, sent) => {
            lingering.note_start(&write);
            // The attempt's RUNNING goes in the same batch as its result.
            queue.extend(lingering.started.remove(write.task_id()).map(|w| (w, None)));
            let waiter = match sent {
                Sent::Waited(waiter) => Some(waiter),
                Sent::Later | Sent::Plain => None,
            };
            queue.push_back((write, waiter));
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;

    /// `super::take`, with the queued writes and their waiters apart.
    fn take(
        item: Item,
        writes: &mut Vec<StatusWrite>,
        waiters: &mut Vec<Waiter>,
        lingering: &mut KeptBack,
    ) {
        let mut queue = VecDeque::new();
        super::take(item, &mut queue, lingering);
        for (write, waiter) in queue {
            writes.push(write);
            waiters.extend(waiter);
        }
    }

    fn started(id: TaskId, attempt: u32) -> StatusWrite {
        StatusWrite::Started {
            id,
            attempt,
            worker_id: "w".into(),
            at: Utc::now(),
        }
    }

    fn dispatched(id: TaskId) -> StatusWrite {
        StatusWrite::Dispatched { id, at: Utc::now() }
    }

    fn finished(id: TaskId, attempt: u32) -> StatusWrite {
        StatusWrite::Finished {
            id,
            attempt,
            state: crate::domain::TaskState::Succeeded,
            error: None,
            detail: None,
            at: Utc::now(),
            worker_id: "w".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_start_drops_the_lingering_release_and_the_rest_wait_their_turn() {
        let (a, b, c) = (TaskId::new(), TaskId::new(), TaskId::new());
        let mut lingering = Lingering::new(DISPATCHED_LINGER);
        for id in [a, b, c] {
            assert!(lingering.add(dispatched(id)).is_none());
        }
        lingering.implied_by(&started(a, 1));
        // A later attempt's start implies no release (RetryTask re-dispatches).
        lingering.implied_by(&started(c, 2));

        let mut writes = Vec::new();
        lingering.take_due(&mut writes, false);
        assert!(writes.is_empty(), "nothing before the linger is over");

        tokio::time::advance(DISPATCHED_LINGER).await;
        lingering.take_due(&mut writes, false);
        let ids: Vec<TaskId> = writes
            .iter()
            .map(|w| match w {
                StatusWrite::Dispatched { id, .. } => *id,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(ids, vec![b, c]);
        assert!(lingering.is_empty());
    }

    #[test]
    fn a_release_ahead_goes_with_the_next_batch_unless_its_start_came_first() {
        let (ahead, overtaken) = (TaskId::new(), TaskId::new());
        let mut lingering = KeptBack::default();
        let (mut writes, mut waiters) = (Vec::new(), Vec::new());
        take(
            (started(overtaken, 1), Sent::Waited(oneshot::channel().0)),
            &mut writes,
            &mut waiters,
            &mut lingering,
        );
        writes.clear();
        for id in [ahead, overtaken] {
            take(
                (dispatched(id), Sent::Plain),
                &mut writes,
                &mut waiters,
                &mut lingering,
            );
        }
        assert!(matches!(writes[..], [StatusWrite::Dispatched { id, .. }] if id == ahead));
        assert!(lingering.is_empty(), "nothing kept back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_result_takes_its_lingering_start_along_and_a_lone_start_waits_its_turn() {
        let (quick, slow) = (TaskId::new(), TaskId::new());
        let mut lingering = KeptBack::default();
        let (mut writes, mut waiters) = (Vec::new(), Vec::new());
        for id in [quick, slow] {
            take(
                (dispatched(id), Sent::Later),
                &mut writes,
                &mut waiters,
                &mut lingering,
            );
            take(
                (started(id, 1), Sent::Later),
                &mut writes,
                &mut waiters,
                &mut lingering,
            );
        }
        assert!(writes.is_empty(), "releases and starts wait");
        assert!(
            lingering.dispatched.is_empty(),
            "the starts implied the releases"
        );

        let (done, _answer) = oneshot::channel();
        take(
            (finished(quick, 1), Sent::Waited(done)),
            &mut writes,
            &mut waiters,
            &mut lingering,
        );
        assert!(matches!(writes[..], [
            StatusWrite::Started { id: a, .. },
            StatusWrite::Finished { id: b, .. },
        ] if a == quick && b == quick));
        assert_eq!(waiters.len(), 1);
        let mut only_quick = Lingering::new(STARTED_LINGER);
        let _ = only_quick.add(started(quick, 1));
        let _ = only_quick.remove(quick);
        assert_eq!(only_quick.next_deadline(), None, "no wake for a start gone");

        writes.clear();
        lingering.take_due(&mut writes, false);
        assert!(
            writes.is_empty(),
            "the slow task's start waits for its result"
        );
        tokio::time::advance(STARTED_LINGER).await;
        assert_eq!(lingering.next_deadline(), Some(Instant::now()), "due now");
        lingering.take_due(&mut writes, false);
        assert!(matches!(writes[..], [StatusWrite::Started { id, .. }] if id == slow));
        assert!(lingering.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_release_recorded_after_its_first_start_is_dropped() {
        let (early, retried, late) = (TaskId::new(), TaskId::new(), TaskId::new());
        let mut lingering = KeptBack::default();
        let (mut writes, mut waiters) = (Vec::new(), Vec::new());
        for write in [started(early, 1), started(retried, 2), dispatched(early)] {
            take(
                (write, Sent::Later),
                &mut writes,
                &mut waiters,
                &mut lingering,
            );
        }
        take(
            (dispatched(retried), Sent::Later),
            &mut writes,
            &mut waiters,
            &mut lingering,
        );
        let waiting: Vec<TaskId> = lingering.dispatched.waiting.keys().copied().collect();
        assert_eq!(
            waiting,
            vec![retried],
            "only a first start implies the release"
        );

        // Remembered only as long as a release may linger.
        take(
            (started(late, 1), Sent::Later),
            &mut writes,
            &mut waiters,
            &mut lingering,
        );
        tokio::time::advance(DISPATCHED_LINGER).await;
        take(
            (started(TaskId::new(), 1), Sent::Later),
            &mut writes,
            &mut waiters,
            &mut lingering,
        );
        assert!(!lingering.begun.implies(late));
        assert_eq!(lingering.begun.ids.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_writes_everything_lingering_at_once() {
        let mut lingering = KeptBack::default();
        let (mut writes, mut waiters) = (Vec::new(), Vec::new());
        take(
            (dispatched(TaskId::new()), Sent::Later),
            &mut writes,
            &mut waiters,
            &mut lingering,
        );
        take(
            (dispatched(TaskId::new()), Sent::Later),
            &mut writes,
            &mut waiters,
            &mut lingering,
        );
        take(
            (started(TaskId::new(), 2), Sent::Later),
            &mut writes,
            &mut waiters,
            &mut lingering,
        );
        assert!(writes.is_empty());
        lingering.take_due(&mut writes, true);
        assert_eq!(writes.len(), 3);
        assert!(lingering.is_empty());
    }
}

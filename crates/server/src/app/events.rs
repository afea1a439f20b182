//! Subscribe: every replica follows the one SQL event log and fans its events
//! out to the subscribers connected to it.
//!
//! Writers append events in commit order (see `store::sql`), so "every event
//! up to cursor N" is a fact any replica can read. A replica with subscribers
//! reads the log forward when another replica signals a commit over core NATS
//! (or after `poll` without a signal), and hands each event to the bounded
//! buffer of every subscriber whose filter it passes. A subscription that
//! starts from a cursor registers first, then replays the log up to the
//! position it registered at, then takes its buffer: no gap and no duplicate
//! at the seam.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::Utc;
use futures::{Stream, StreamExt};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{AppError, AppResult};
use crate::bus::Bus;
use crate::domain::{EventFilter, StartAt, Subscription, TaskEvent};
use crate::store::DynStore;

/// Events read from SQL per statement, live or replaying.
const PAGE: u32 = 1000;

/// Settings of the event log and of Subscribe.
#[derive(Debug, Clone)]
pub struct EventSettings {
    /// Events one subscriber may have waiting before it is cut off.
    pub buffer: usize,
    /// How often the log is read when no commit was signalled.
    pub poll: Duration,
    /// How long events are kept.
    pub retention: Duration,
}

/// Why a subscription ended; each carries the cursor to resume after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscribeEnd {
    /// The subscriber read too slowly and its buffer filled.
    Lagged {
        /// Last cursor delivered.
        after: i64,
        /// The buffer size it overran.
        buffer: usize,
    },
    /// The server is shutting down.
    ShuttingDown {
        /// Last cursor delivered.
        after: i64,
    },
    /// The event log could not be read.
    Unavailable {
        /// Last cursor delivered.
        after: i64,
        /// The cause, for logs.
        cause: String,
    },
}

/// One subscriber as the hub sees it.
#[derive(Debug)]
struct Subscriber {
    id: u64,
    filter: EventFilter,
    tx: mpsc::Sender<Arc<TaskEvent>>,
    lagged: Arc<AtomicBool>,
}

#[derive(Debug, Default)]
struct HubState {
    /// Cursor read up to; `None` while this replica has no subscriber.
    position: Option<i64>,
    subscribers: Vec<Subscriber>,
    next_id: u64,
}

#[derive(Debug)]
struct Hub {
    store: DynStore,
    state: Mutex<HubState>,
    wake: Notify,
    settings: EventSettings,
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, HubState> {
        // A panic while holding the lock cannot leave the state half-changed
        // in a way that matters more than losing Subscribe altogether.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads the log forward and fans it out, until it is caught up.
    async fn catch_up(&self) {
        loop {
            let from = {
                let mut state = self.lock();
                if state.subscribers.is_empty() {
                    // Nobody listens: stop following; the next subscriber
                    // starts from the then newest cursor.
                    state.position = None;
                }
                state.position
            };
            let Some(from) = from else { return };
            let events = match self
                .store
                .read_events(from, i64::MAX, &EventFilter::default(), PAGE)
                .await
            {
                Ok(events) => events,
                Err(err) => {
                    warn!(error = %err, "event log not read");
                    return;
                }
            };
            let Some(last) = events.last().map(|e| e.cursor) else {
                return;
            };
            let full = events.len() == PAGE as usize;
            let mut state = self.lock();
            if state.position != Some(from) {
                // Restarted meanwhile from a newer cursor.
                continue;
            }
            for event in events {
                let event = Arc::new(event);
                state.subscribers.retain(|sub| {
                    if !sub.filter.matches(&event) {
                        return true;
                    }
                    match sub.tx.try_send(event.clone()) {
                        Ok(()) => true,
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            sub.lagged.store(true, Ordering::Release);
                            false
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => false,
                    }
                });
            }
            state.position = Some(last);
            if !full {
                return;
            }
        }
    }
}

/// A subscriber's place in the hub; leaving it (drop) unregisters.
#[derive(Debug)]
struct Registration {
    hub: Arc<Hub>,
    id: u64,
    rx: mpsc::Receiver<Arc<TaskEvent>>,
    lagged: Arc<AtomicBool>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.lock().subscribers.retain(|s| s.id != self.id);
    }
}

/// The Subscribe use case. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EventService {
    hub: Arc<Hub>,
    shutdown: CancellationToken,
}

/// A live subscription: events, then at most one end.
pub type EventStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<TaskEvent, SubscribeEnd>> + Send>>;

impl EventService {
    /// Creates the service; its streams end when `shutdown` fires.
    pub fn new(store: DynStore, settings: EventSettings, shutdown: CancellationToken) -> Self {
        let hub = Arc::new(Hub {
            store,
            state: Mutex::new(HubState::default()),
            wake: Notify::new(),
            settings,
        });
        Self { hub, shutdown }
    }

    /// Follows the log until `stop` fires: wakes on every commit signal, and
    /// prunes events older than the retention now and then.
    pub async fn run(self, bus: Bus, stop: CancellationToken) {
        let hub = self.hub.clone();
        let signals = match bus.event_signals().await {
            Ok(signals) => Some(signals),
            Err(err) => {
                warn!(error = %err, "no event signals; Subscribe falls back to polling");
                None
            }
        };
        let relay = signals.map(|mut signals| {
            let hub = hub.clone();
            tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
                while signals.next().await.is_some() {
                    hub.wake.notify_one();
                }
            }))
        });
        let prune_every = Duration::from_secs(60);
        let mut next_prune = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                () = hub.wake.notified() => {}
                () = tokio::time::sleep(hub.settings.poll) => {}
            }
            hub.catch_up().await;
            if tokio::time::Instant::now() >= next_prune {
                next_prune += prune_every;
                self.prune().await;
            }
        }
        drop(relay);
        debug!("event hub stopped");
    }

    /// Deletes events older than the retention, a bounded amount per call.
    async fn prune(&self) {
        let retention = chrono::Duration::from_std(self.hub.settings.retention)
            .unwrap_or(chrono::Duration::MAX);
        let Some(before) = Utc::now().checked_sub_signed(retention) else {
            return;
        };
        for _ in 0..10 {
            match self
                .hub
                .store
                .prune_events(before.timestamp_millis(), 10_000)
                .await
            {
                Ok(0) => return,
                Ok(n) => debug!(events = n, "pruned old events"),
                Err(err) => {
                    warn!(error = %err, "old events not pruned");
                    return;
                }
            }
        }
    }

    /// Registers a subscriber: events committed from now on are buffered
    /// for it. Returns its registration and the cursor it starts after.
    async fn register(&self, filter: EventFilter) -> AppResult<(Registration, i64)> {
        let hub = &self.hub;
        let (tx, rx) = mpsc::channel(hub.settings.buffer.max(1));
        let lagged = Arc::new(AtomicBool::new(false));
        let add = |state: &mut HubState, filter: EventFilter| {
            let id = state.next_id;
            state.next_id += 1;
            state.subscribers.push(Subscriber {
                id,
                filter,
                tx,
                lagged: lagged.clone(),
            });
            id
        };
        let newest = {
            let state = hub.lock();
            state.position
        };
        let newest = match newest {
            Some(position) => position,
            // Not following the log yet: start from its newest cursor. Events
            // committed since are read from there, so none is missed.
            None => hub.store.last_event().await?,
        };
        let (id, position) = {
            let mut state = hub.lock();
            let position = *state.position.get_or_insert(newest);
            (add(&mut state, filter), position)
        };
        hub.wake.notify_one();
        Ok((
            Registration {
                hub: hub.clone(),
                id,
                rx,
                lagged,
            },
            position,
        ))
    }

    /// Starts a subscription; the stream replays what the start point asks
    /// for, then follows live events until the subscriber goes, falls
    /// behind, or the server shuts down. Also returns the cursor it starts
    /// after, from which a subscriber that saw no event yet resumes.
    pub async fn subscribe(&self, subscription: Subscription) -> AppResult<(EventStream, i64)> {
        let Subscription { filter, start } = subscription;
        let after = match start {
            StartAt::Now => None,
            StartAt::Beginning => Some(0),
            StartAt::After(cursor) => {
                let pruned = self.hub.store.pruned_through().await?;
                if cursor < pruned {
                    return Err(AppError::OutOfRange(format!(
                        "after_cursor {cursor} is older than the retained events \
                         (those through {pruned} were pruned); subscribe from {pruned} or later"
                    )));
                }
                Some(cursor)
            }
        };
        let (registration, position) = self.register(filter.clone()).await?;
        let replay = after.filter(|&a| a < position).map(|a| (a, position));
        let start = after.unwrap_or(position).max(0);
        let state = Follow {
            store: self.hub.store.clone(),
            filter,
            registration,
            replay,
            pending: std::collections::VecDeque::new(),
            last: start,
            shutdown: self.shutdown.clone(),
            buffer: self.hub.settings.buffer,
            done: false,
        };
        let stream = futures::stream::unfold(state, |mut state| async move {
            let item = state.next().await?;
            Some((item, state))
        });
        Ok((Box::pin(stream), start))
    }
}

/// The state of one subscription's stream.
struct Follow {
    store: DynStore,
    filter: EventFilter,
    registration: Registration,
    /// Cursors `(after, upto]` still to replay from SQL before the buffer.
    replay: Option<(i64, i64)>,
    /// Replayed events not yet handed out.
    pending: std::collections::VecDeque<TaskEvent>,
    /// Last cursor handed out (or the start point).
    last: i64,
    shutdown: CancellationToken,
    buffer: usize,
    done: bool,
}

impl Follow {
    async fn next(&mut self) -> Option<Result<TaskEvent, SubscribeEnd>> {
        if self.done {
            return None;
        }
        let item = self.step().await;
        match &item {
            Ok(event) => self.last = event.cursor,
            Err(_) => self.done = true,
        }
        Some(item)
    }

    async fn step(&mut self) -> Result<TaskEvent, SubscribeEnd> {
        loop {
            if self.shutdown.is_cancelled() {
                return Err(SubscribeEnd::ShuttingDown { after: self.last });
            }
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            if let Some((after, upto)) = self.replay {
                let page = self
                    .store
                    .read_events(after, upto, &self.filter, PAGE)
                    .await;
                let page = page.map_err(|err| SubscribeEnd::Unavailable {
                    after: self.last,
                    cause: err.to_string(),
                })?;
                self.replay = match page.last() {
                    Some(event) if page.len() == PAGE as usize => Some((event.cursor, upto)),
                    _ => None,
                };
                self.pending.extend(page);
                continue;
            }
            if self.registration.lagged.load(Ordering::Acquire) {
                return Err(SubscribeEnd::Lagged {
                    after: self.last,
                    buffer: self.buffer,
                });
            }
            let next = tokio::select! {
                () = self.shutdown.cancelled() => continue,
                next = self.registration.rx.recv() => next,
            };
            match next {
                // A cursor from a replica further ahead than this one: skip
                // what the subscriber already has.
                Some(event) if event.cursor <= self.last => {}
                Some(event) => return Ok((*event).clone()),
                // The hub dropped the sender: this subscriber fell behind.
                None => {
                    return Err(SubscribeEnd::Lagged {
                        after: self.last,
                        buffer: self.buffer,
                    });
                }
            }
        }
    }
}

//! The worker run loop: pull from the queue's two durable consumers (tasks
//! due now, served first, and tasks released ahead, held until their due
//! time without a run slot), ask the server to start each attempt, run the
//! handler, report, then acknowledge.
//!
//! | handler outcome | JetStream message |
//! |---|---|
//! | `Ok` | acknowledged (a lost ack only means a redelivery, which the start claim skips) |
//! | retryable, attempts left | `Nak` with exponential backoff (the delivery count is the attempt) |
//! | terminal, or the last attempt | `Term` |
//! | still running | `Progress` every third of `ack_wait` |

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer};
use chrono::{DateTime, Utc};
use futures::{FutureExt as _, StreamExt};
use kairos_proto::v1 as pb;
use kairos_proto::wire;
use prost::Message as _;
use rand::Rng as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tonic::transport::Endpoint;
use tracing::{debug, info, warn};

use crate::acker::Acker;
use crate::handler::{Erased, ErasedHandler, Handler, HandlerError, TaskContext};
use crate::hold::Hold;
use crate::reporter::Reporter;

/// Errors that stop a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The builder was missing something or had a bad value.
    #[error("invalid worker configuration: {0}")]
    Config(String),
    /// NATS could not be reached or refused a JetStream request.
    #[error("nats: {0}")]
    Nats(String),
}

/// Builds a [`Worker`].
#[must_use]
pub struct WorkerBuilder {
    server: String,
    nats: String,
    queue: Option<(String, Arc<dyn ErasedHandler>)>,
    concurrency: usize,
    hold: usize,
    worker_id: Option<String>,
    ack_wait: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    shutdown_timeout: Duration,
}

impl std::fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("server", &self.server)
            .field("nats", &self.nats)
            .field("queue", &self.queue.as_ref().map(|(q, _)| q))
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl Default for WorkerBuilder {
    fn default() -> Self {
        Self {
            server: "http://127.0.0.1:50051".into(),
            nats: "nats://127.0.0.1:4222".into(),
            queue: None,
            concurrency: 8,
            hold: 1_000,
            worker_id: None,
            ack_wait: Duration::from_secs(30),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

impl WorkerBuilder {
    /// Sets the kairos-server address (`http://host:port`).
    pub fn server(mut self, url: impl Into<String>) -> Self {
        self.server = url.into();
        self
    }

    /// Sets the NATS address.
    pub fn nats(mut self, url: impl Into<String>) -> Self {
        self.nats = url.into();
        self
    }

    /// Sets the queue to serve and its handler.
    pub fn queue<H: Handler>(mut self, queue: impl Into<String>, handler: H) -> Self {
        self.queue = Some((queue.into(), Arc::new(Erased(Arc::new(handler)))));
        self
    }

    /// Sets how many tasks this process runs at once.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// Sets how many tasks released ahead of their due time this process
    /// holds until then (default 1,000); they use no run slot while they
    /// wait, and the rest wait in the queue's ahead lane.
    pub fn hold(mut self, n: usize) -> Self {
        self.hold = n;
        self
    }

    /// Sets the worker identity recorded in the run log (default: pid and a random suffix).
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.worker_id = Some(id.into());
        self
    }

    /// Sets the run timeout used when this worker creates the queue's consumer:
    /// a task not acknowledged (nor kept alive) for this long is redelivered.
    pub fn ack_wait(mut self, d: Duration) -> Self {
        self.ack_wait = d;
        self
    }

    /// Sets the retry backoff used while the queue's consumer carries no
    /// retry policy (the server sets one on every queue it knows):
    /// `initial * 2^(attempt-1)`, at most `max`, ±20 % jitter.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = max;
        self
    }

    /// Sets how long shutdown waits for running tasks.
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.shutdown_timeout = d;
        self
    }

    /// Checks the settings and returns the worker.
    pub fn build(self) -> Result<Worker, WorkerError> {
        let (queue, handler) = self
            .queue
            .ok_or_else(|| WorkerError::Config("no queue set".into()))?;
        if !wire::is_valid_queue(&queue) {
            return Err(WorkerError::Config(format!(
                "queue `{queue}` must be 1 to 64 of A-Z, a-z, 0-9, '_' and '-'"
            )));
        }
        if self.concurrency == 0 {
            return Err(WorkerError::Config("concurrency must be at least 1".into()));
        }
        if self.hold == 0 {
            return Err(WorkerError::Config("hold must be at least 1".into()));
        }
        let endpoint = Endpoint::from_shared(self.server.clone())
            .map_err(|e| WorkerError::Config(format!("bad server url: {e}")))?
            .connect_timeout(Duration::from_secs(3))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10));
        let worker_id = self.worker_id.unwrap_or_else(|| {
            format!(
                "worker-{}-{}",
                std::process::id(),
                &uuid::Uuid::now_v7().simple().to_string()[24..]
            )
        });
        Ok(Worker {
            inner: Arc::new(Inner {
                endpoint,
                nats: self.nats,
                queue,
                handler,
                worker_id,
                concurrency: self.concurrency,
                hold: self.hold,
                ack_wait: self.ack_wait,
                policy: std::sync::RwLock::new(Policy {
                    ack_wait: self.ack_wait,
                    initial: self.backoff_initial,
                    max: self.backoff_max,
                    multiplier: 2.0,
                    jitter: 0.2,
                }),
                shutdown_timeout: self.shutdown_timeout,
            }),
        })
    }
}

/// A worker serving one queue.
#[derive(Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("queue", &self.inner.queue)
            .field("worker_id", &self.inner.worker_id)
            .finish_non_exhaustive()
    }
}

struct Inner {
    endpoint: Endpoint,
    nats: String,
    queue: String,
    handler: Arc<dyn ErasedHandler>,
    worker_id: String,
    concurrency: usize,
    hold: usize,
    ack_wait: Duration,
    /// The queue's run timeout and retry policy, as its consumer says now.
    policy: std::sync::RwLock<Policy>,
    shutdown_timeout: Duration,
}

/// What a worker follows of its queue's settings; the server changes them
/// on the queue's consumer and workers read them again every few seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Policy {
    ack_wait: Duration,
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: f64,
}

/// Converts a protobuf duration; a negative one counts as zero.
fn std_duration(d: &prost_types::Duration) -> Duration {
    Duration::new(
        u64::try_from(d.seconds).unwrap_or(0),
        u32::try_from(d.nanos).unwrap_or(0),
    )
}

impl Policy {
    /// Returns this policy with the fields a task set for itself.
    fn with_task(mut self, own: Option<&pb::Backoff>) -> Self {
        let Some(own) = own else { return self };
        if let Some(d) = &own.initial {
            self.initial = std_duration(d);
        }
        if let Some(d) = &own.max {
            self.max = std_duration(d);
        }
        if let Some(m) = own.multiplier {
            self.multiplier = m.clamp(1.0, 10.0);
        }
        if let Some(j) = own.jitter {
            self.jitter = j.clamp(0.0, 1.0);
        }
        self
    }
}

/// How often a worker reads its queue's settings again.
const POLICY_REFRESH: Duration = Duration::from_secs(2);

impl Inner {
    fn policy(&self) -> Policy {
        *self
            .policy
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the run timeout and retry policy from the consumer's config.
    fn follow(&self, config: &consumer::Config) {
        let mut policy = self.policy();
        policy.ack_wait = config.ack_wait;
        let meta = |key: &str| config.metadata.get(key).and_then(|v| v.parse::<f64>().ok());
        if let Some(ms) = meta(wire::RETRY_INITIAL_MS_KEY) {
            policy.initial = Duration::from_secs_f64(ms.max(0.0) / 1000.0);
        }
        if let Some(ms) = meta(wire::RETRY_MAX_MS_KEY) {
            policy.max = Duration::from_secs_f64(ms.max(0.0) / 1000.0);
        }
        if let Some(m) = meta(wire::RETRY_MULTIPLIER_KEY) {
            policy.multiplier = m.clamp(1.0, 10.0);
        }
        if let Some(j) = meta(wire::RETRY_JITTER_KEY) {
            policy.jitter = j.clamp(0.0, 1.0);
        }
        let mut current = self
            .policy
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *current != policy {
            debug!(?policy, "queue settings changed");
            *current = policy;
        }
    }
}

impl Worker {
    /// Returns a builder with defaults for a local stack.
    pub fn builder() -> WorkerBuilder {
        WorkerBuilder::default()
    }

    /// Returns this worker's identity.
    pub fn id(&self) -> &str {
        &self.inner.worker_id
    }

    /// Runs until `shutdown`: then stops pulling, lets running tasks finish
    /// (up to the shutdown timeout) and reports their results.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let inner = &self.inner;
        let (connected, connections) = tokio::sync::watch::channel(0_u64);
        let connected = Arc::new(connected);
        let client = async_nats::ConnectOptions::new()
            .name(&inner.worker_id)
            .retry_on_initial_connect()
            .event_callback(move |event| {
                let connected = connected.clone();
                async move {
                    if matches!(event, async_nats::Event::Connected) {
                        connected.send_modify(|n| *n += 1);
                    }
                }
            })
            .connect(&inner.nats)
            .await
            .map_err(|e| WorkerError::Nats(e.to_string()))?;
        // Shared by reference: a context clone per delivery copies its prefix string.
        let js = Arc::new(jetstream::new(client.clone()));
        let Some(consumer) = queue_consumer(&js, inner, &shutdown).await? else {
            return Ok(());
        };
        inner.follow(&consumer.cached_info().config);
        // Settings changed on the server reach this worker without a restart.
        let _refresh = {
            let (mut consumer, inner) = (consumer.clone(), self.inner.clone());
            AbortOnDropHandle::new(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(POLICY_REFRESH).await;
                    match consumer.info().await {
                        Ok(info) => inner.follow(&info.config),
                        Err(err) => debug!(error = %err, "queue settings not read"),
                    }
                }
            }))
        };
        let abort = CancellationToken::new();
        // Dropping this future (a killed worker) stops its running tasks too:
        // no more in-progress acks, so JetStream delivers them again after
        // the run timeout, as it would after the process died.
        let _abort_on_drop = abort.clone().drop_guard();
        let (reporter, reporter_task) = Reporter::spawn(
            inner.endpoint.clone(),
            inner.worker_id.clone(),
            abort.clone(),
        );
        let (acker, acker_task) = Acker::spawn();
        let tracker = TaskTracker::new();
        info!(
            queue = inner.queue,
            worker_id = inner.worker_id,
            "worker started"
        );
        let lanes = Lanes {
            worker: &self,
            js: &js,
            reporter: &reporter,
            acker: &acker,
            tracker: &tracker,
            slots: Arc::new(Semaphore::new(inner.concurrency)),
            hold: Hold::default(),
            abort: &abort,
            shutdown: &shutdown,
            connections,
        };
        // Boxed, so that the future of `run` stays small for its callers.
        tokio::join!(
            Box::pin(lanes.pull(Lane::Due, Some(consumer), inner.concurrency)),
            Box::pin(lanes.pull(Lane::Ahead, None, inner.hold)),
            Box::pin(lanes.start_held()),
        );

        info!(
            running = tracker.len(),
            "worker stopping; finishing running tasks"
        );
        tracker.close();
        if tokio::time::timeout(inner.shutdown_timeout, tracker.wait())
            .await
            .is_err()
        {
            warn!("shutdown timeout: unfinished tasks will be redelivered");
            abort.cancel();
        }
        drop(reporter);
        if tokio::time::timeout(inner.shutdown_timeout, reporter_task)
            .await
            .is_err()
        {
            abort.cancel();
        }
        // The acknowledgements of the last results, before the flush.
        drop(acker);
        let _ = tokio::time::timeout(inner.shutdown_timeout, acker_task).await;
        let _ = client.flush().await;
        Ok(())
    }
}

/// Whether, after a reconnect, the consumer holds no waiting pull: a
/// restarted server keeps none. One it cannot read counts as forgotten too,
/// as a server still starting has none; a fresh pull costs little.
async fn pull_forgotten(consumer: &consumer::PullConsumer) -> bool {
    consumer
        .get_info()
        .await
        .map_or(true, |info| info.num_waiting == 0)
}

/// Which of a queue's two subjects a pull loop serves (see
/// [`wire::ahead_subject`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// The queue's own subject: tasks due now, served first.
    Due,
    /// Tasks released ahead of their due time, held without a run slot.
    Ahead,
}

/// What the pull loops and the hold's starter of one worker share.
struct Lanes<'a> {
    worker: &'a Worker,
    js: &'a Arc<jetstream::Context>,
    reporter: &'a Reporter,
    /// Acknowledges settled deliveries together.
    acker: &'a Acker,
    tracker: &'a TaskTracker,
    /// Run slots: handlers running at once.
    slots: Arc<Semaphore>,
    hold: Hold,
    abort: &'a CancellationToken,
    shutdown: &'a CancellationToken,
    /// Changes each time the client connects to NATS (see [`Lanes::pull`]).
    connections: tokio::sync::watch::Receiver<u64>,
}

/// Most deliveries asked for in one pull of the ahead lane.
const AHEAD_PULL: usize = 1024;

impl Lanes<'_> {
    /// The pull loop of one lane: takes as many deliveries as it has `room`
    /// for (as many as run slots for the due lane, the hold for the ahead
    /// lane), each kept until its handler returned. A due
    /// delivery is settled in a task of its own; an early one goes into the
    /// hold. `consumer` is `None` until found: the ahead lane's consumer is
    /// the server's to create.
    async fn pull(&self, lane: Lane, mut consumer: Option<consumer::PullConsumer>, room: usize) {
        let shutdown = self.shutdown;
        let room = Arc::new(Semaphore::new(room));
        let mut connections = self.connections.clone();
        connections.mark_unchanged();
        loop {
            let Some(current) = consumer.clone() else {
                consumer = Some(match self.find_ahead().await {
                    Some(found) => found,
                    None => return,
                });
                continue;
            };
            let first = tokio::select! {
                () = shutdown.cancelled() => return,
                permit = room.clone().acquire_owned() => permit.expect("semaphore open"),
            };
            let mut permits = vec![first];
            let most = match lane {
                Lane::Due => usize::MAX,
                Lane::Ahead => AHEAD_PULL,
            };
            while permits.len() < most
                && let Ok(p) = room.clone().try_acquire_owned()
            {
                permits.push(p);
            }
            let batch = current
                .batch()
                .max_messages(permits.len())
                .expires(Duration::from_secs(2))
                .messages()
                .await;
            let mut batch = match batch {
                Ok(batch) => batch,
                Err(err) => {
                    debug!(error = %err, ?lane, "pull failed; retrying");
                    if lane == Lane::Ahead {
                        // Removed when the queue got a concurrency limit.
                        consumer = None;
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            let mut interrupted = false;
            loop {
                // Deliveries first: while they flow, the watch is never
                // polled, so it adds no waiter registration per delivery.
                let next = tokio::select! {
                    biased;
                    next = batch.next() => next,
                    Ok(()) = connections.changed() => {
                        if pull_forgotten(&current).await {
                            // A restarted server forgot it; its client
                            // would wait for it until 5 s past its expiry.
                            debug!(?lane, "pull lost with a NATS restart; pulling anew");
                            interrupted = true;
                            break;
                        }
                        continue;
                    }
                };
                let Some(next) = next else { break };
                let msg = match next {
                    Ok(msg) => msg,
                    Err(err) => {
                        // A batch that failed (its consumer deleted, NATS
                        // gone) may keep failing at once: pull anew instead.
                        debug!(error = %err, ?lane, "pull interrupted");
                        interrupted = true;
                        break;
                    }
                };
                if shutdown.is_cancelled() {
                    // Hand it straight back so another worker takes it now.
                    let _ = msg.ack_with(AckKind::Nak(None)).await;
                    continue;
                }
                let Some(room) = permits.pop() else {
                    let _ = msg.ack_with(AckKind::Nak(None)).await;
                    continue;
                };
                match lane {
                    Lane::Due => self.spawn(Arc::new(msg), None, None, room),
                    Lane::Ahead => self.hold.push(msg, room),
                }
            }
            if shutdown.is_cancelled() {
                return;
            }
            if interrupted && lane == Lane::Ahead {
                // Removed when the queue got a concurrency limit: find it
                // again (find_ahead waits while there is none).
                consumer = None;
            }
        }
    }

    /// Hands held deliveries a run slot each once due, earliest first. The
    /// due lane's deliveries ask the same FIFO semaphore directly, so at
    /// most one held delivery waits for a slot ahead of them.
    async fn start_held(&self) {
        let shutdown = self.shutdown;
        let mut swept = tokio::time::Instant::now();
        loop {
            // Held longer than a third of the run timeout, a delivery is
            // kept alive, or JetStream would hand it to another worker.
            let every = (self.worker.inner.policy().ack_wait / 3).max(Duration::from_millis(100));
            if swept.elapsed() >= every {
                swept = self.keep_held_alive(every);
            }
            let now_us = Utc::now().timestamp_micros();
            let wait = match self.hold.next_due() {
                Some(due_us) if due_us <= now_us => None,
                Some(due_us) => Some(Duration::from_micros((due_us - now_us).unsigned_abs())),
                None => Some(every),
            };
            if let Some(wait) = wait {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(wait.min(every)) => {}
                    () = self.hold.added() => {}
                }
                continue;
            }
            let slot = match self.slots.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => {
                    let slot = tokio::select! {
                        () = shutdown.cancelled() => break,
                        slot = self.slots.clone().acquire_owned() => slot.expect("never closed"),
                        // Slots may stay busy longer than the run timeout.
                        () = tokio::time::sleep_until(swept + every) => continue,
                    };
                    // Handlers finishing beside the one that freed this slot
                    // free theirs too: their successors then start together,
                    // one report and one claim batch for all.
                    tokio::task::yield_now().await;
                    slot
                }
            };
            if let Some(held) = self.hold.pop_due(now_us) {
                self.spawn(held.msg, held.envelope, Some(slot), held.room);
            }
        }
        // Hand them back so other workers take them now.
        for held in self.hold.take_all() {
            let _ = held.msg.ack_with(AckKind::Nak(None)).await;
        }
    }

    /// Tells JetStream that the deliveries held for a while are still being
    /// worked on, beside the starter rather than in its way; returns when
    /// it looked.
    fn keep_held_alive(&self, every: Duration) -> tokio::time::Instant {
        let stale = self.hold.stale(every);
        if !stale.is_empty() {
            tokio::spawn(async move {
                for msg in stale {
                    let _ = msg.ack_with(AckKind::Progress).await;
                }
            });
        }
        tokio::time::Instant::now()
    }

    /// Settles one delivery in a task of its own, kept alive while it runs.
    fn spawn(
        &self,
        msg: Arc<jetstream::Message>,
        envelope: Option<Box<pb::TaskEnvelope>>,
        slot: Option<OwnedSemaphorePermit>,
        room: OwnedSemaphorePermit,
    ) {
        let (inner, reporter, acker, cancelled, abort, js, slots) = (
            self.worker.inner.clone(),
            self.reporter.clone(),
            self.acker.clone(),
            self.shutdown.clone(),
            self.abort.clone(),
            self.js.clone(),
            self.slots.clone(),
        );
        self.tracker.spawn(async move {
            // The keep-alive is polled beside the attempt rather than
            // spawned: a burst's profile showed the bookkeeping of a
            // task spawned per delivery (BENCHMARKS item 29). The attempt
            // is boxed: this future is copied whole on its way into its
            // task, and the attempt's state is most of it (item 40).
            let every = inner.policy().ack_wait / 3;
            let place = Place { slots, slot, room };
            tokio::select! {
                biased;
                () = Box::pin(settle(&inner, (&reporter, &acker), &js, cancelled, &msg, envelope, place)) => {}
                never = keep_alive(&msg, every) => match never {},
                () = abort.cancelled() => {}
            }
        });
    }

    /// Waits for the queue's ahead consumer, which the server creates for a
    /// queue without a concurrency limit. `None` when shut down meanwhile.
    async fn find_ahead(&self) -> Option<consumer::PullConsumer> {
        let name = wire::ahead_consumer(&self.worker.inner.queue);
        loop {
            let found = match self.js.get_stream(wire::READY_STREAM).await {
                Ok(stream) => stream.get_consumer(&name).await.ok(),
                Err(_) => None,
            };
            if found.is_some() {
                return found;
            }
            tokio::select! {
                () = self.shutdown.cancelled() => return None,
                () = tokio::time::sleep(POLICY_REFRESH) => {}
            }
        }
    }
}

/// What a delivery holds while it is settled: its place in its lane's room,
/// and its run slot once it has one.
struct Place {
    slots: Arc<Semaphore>,
    /// Given by the hold's starter; a due delivery takes its own.
    slot: Option<OwnedSemaphorePermit>,
    room: OwnedSemaphorePermit,
}

/// Waits for the ready stream (the server creates it) and returns the queue's
/// durable consumer, creating it on first use. `None` when shut down meanwhile.
async fn queue_consumer(
    js: &jetstream::Context,
    inner: &Inner,
    shutdown: &CancellationToken,
) -> Result<Option<consumer::PullConsumer>, WorkerError> {
    let stream = loop {
        match js.get_stream(wire::READY_STREAM).await {
            Ok(stream) => break stream,
            Err(err) => {
                debug!(error = %err, "ready stream not there yet; waiting for kairos-server");
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(None),
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    };
    let name = wire::queue_consumer(&inner.queue);
    let consumer = stream
        .get_or_create_consumer(
            &name,
            consumer::pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: wire::ready_subject(&inner.queue),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: inner.ack_wait,
                max_deliver: -1,
                max_ack_pending: 100_000,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| WorkerError::Nats(e.to_string()))?;
    Ok(Some(consumer))
}

/// Returns the delay before attempt `attempt + 1`: `initial *
/// multiplier^(attempt-1)`, at most `max`, varied by the jitter.
fn backoff(policy: &Policy, attempt: u32) -> Duration {
    let growth = policy
        .multiplier
        .powi(i32::try_from(attempt.saturating_sub(1).min(60)).unwrap_or(60));
    let base = (policy.initial.as_secs_f64() * growth).min(policy.max.as_secs_f64());
    let factor = if policy.jitter > 0.0 {
        rand::rng().random_range(1.0 - policy.jitter..=1.0 + policy.jitter)
    } else {
        1.0
    };
    Duration::from_secs_f64((base * factor).max(0.0)).min(policy.max)
}

fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    std::time::SystemTime::from(t).into()
}

/// Keeps a dead task's envelope in the dead-letter stream, so RetryTask can
/// run it again; a failure only means it cannot be retried later.
async fn keep_dead_letter(js: &jetstream::Context, task_id: &str, envelope: bytes::Bytes) {
    let kept = match js.publish(wire::dead_subject(task_id), envelope).await {
        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(err) => Err(err.to_string()),
    };
    if let Err(err) = kept {
        warn!(task_id, error = %err, "dead letter not kept; RetryTask will not find this task's payload");
    }
}

/// Reports a message whose body is not a task envelope as DEAD, when its
/// headers say which task it is, then terminates it.
async fn report_undecodable(
    reporter: &Reporter,
    msg: &jetstream::Message,
    delivered: u32,
    error: String,
) {
    let header = |name: &str| {
        msg.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
    };
    let bucket = header(wire::BUCKET_HEADER).and_then(|b| b.parse::<i64>().ok());
    if let (Some(task_id), Some(bucket_ms)) = (header(wire::TASK_ID_HEADER), bucket) {
        let event = pb::report::Event::Finished(pb::AttemptFinished {
            task_id,
            attempt: delivered,
            bucket_ms,
            result: pb::AttemptResult::Dead.into(),
            error,
            retry_at: None,
            at: Some(timestamp(Utc::now())),
            detail: String::new(),
        });
        if reporter.send(event).await.is_err() {
            return;
        }
    }
    let _ = msg.ack_with(AckKind::Term).await;
}

/// Tells JetStream every `every` that `msg` is still being worked on, so a
/// slow start answer or a long handler does not get it delivered again.
async fn keep_alive(msg: &jetstream::Message, every: Duration) -> std::convert::Infallible {
    loop {
        tokio::time::sleep(every).await;
        // Boxed, as every rare path here: each delivery's future is copied
        // whole into its task, and a rare await's state would size it.
        let _ = Box::pin(msg.ack_with(AckKind::Progress)).await;
    }
}

/// Asks to start one delivery, runs it and settles its message.
async fn settle(
    inner: &Inner,
    (reporter, acker): (&Reporter, &Acker),
    js: &jetstream::Context,
    shutdown: CancellationToken,
    msg: &Arc<jetstream::Message>,
    decoded: Option<Box<pb::TaskEnvelope>>,
    place: Place,
) {
    let delivered = msg.info().map(|i| i.delivered.max(1) as u32).unwrap_or(1);
    let mut envelope = match decoded.map_or_else(
        || pb::TaskEnvelope::decode(msg.payload.clone()).map(Box::new),
        Ok,
    ) {
        Ok(envelope) => envelope,
        Err(err) => {
            warn!(error = %err, "undecodable task message; reported dead");
            let error = format!("undecodable task message: {err}");
            Box::pin(report_undecodable(reporter, msg, delivered, error)).await;
            return;
        }
    };
    // A task re-run by RetryTask numbers its attempts after those it made.
    let attempt = envelope.attempt_offset.saturating_add(delivered);
    let id = std::mem::take(&mut envelope.id);
    let bucket_ms = envelope.bucket_ms;

    // `detail` is what the handler noted; empty before it ran.
    let finish = |result: pb::AttemptResult,
                  error: String,
                  retry_at: Option<DateTime<Utc>>,
                  detail: String| {
        pb::report::Event::Finished(pb::AttemptFinished {
            task_id: id.clone(),
            attempt,
            bucket_ms,
            result: result.into(),
            error,
            retry_at: retry_at.map(timestamp),
            at: Some(timestamp(Utc::now())),
            detail,
        })
    };

    if attempt > envelope.max_attempts.max(1) {
        // Earlier deliveries were lost with their worker; the attempts are used up.
        let error = format!("attempts used up after {} deliveries", attempt - 1);
        Box::pin(keep_dead_letter(js, &id, msg.payload.clone())).await;
        if reporter
            .send(finish(pb::AttemptResult::Dead, error, None, String::new()))
            .await
            .is_ok()
        {
            let _ = msg.ack_with(AckKind::Term).await;
        }
        return;
    }

    // Tasks are released a little ahead (KAIROS_RELEASE_LEAD): held here, a
    // task starts at its due time without the release path's latency. It
    // takes a run slot only then.
    let early = envelope.due_at_ms.saturating_mul(1000) - Utc::now().timestamp_micros();
    if early > 0 {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_micros(early.unsigned_abs())) => {}
            () = shutdown.cancelled() => {
                let _ = msg.ack_with(AckKind::Nak(None)).await;
                return;
            }
        }
    }
    let slot = match place.slot {
        Some(slot) => slot,
        None => tokio::select! {
            slot = place.slots.acquire_owned() => slot.expect("never closed"),
            () = shutdown.cancelled() => {
                let _ = msg.ack_with(AckKind::Nak(None)).await;
                return;
            }
        },
    };
    let decision = loop {
        let started = pb::report::Event::Started(pb::AttemptStarted {
            task_id: id.clone(),
            attempt,
            bucket_ms,
            at: Some(timestamp(Utc::now())),
            expire_at_ms: envelope.expire_at_ms,
            queue: envelope.queue.clone(),
            due_at_ms: envelope.due_at_ms,
        });
        let Ok(decision) = reporter.send(started).await else {
            return;
        };
        if decision.decision != i32::from(pb::StartDecision::Wait) {
            break decision;
        }
        // Not due yet by the server's clock, or over the queue's rate: hold
        // the task (kept alive) and ask again.
        let wait = decision
            .wait
            .as_ref()
            .map_or(Duration::from_millis(100), std_duration)
            .max(Duration::from_millis(1));
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => {
                // Hand it back so it starts elsewhere, or here after a restart.
                let _ = msg.ack_with(AckKind::Nak(None)).await;
                return;
            }
        }
    };
    if decision.decision != i32::from(pb::StartDecision::Run) {
        debug!(
            task_id = id,
            attempt,
            reason = decision.reason,
            "attempt skipped"
        );
        acker.ack(Arc::clone(msg), None, id);
        return;
    }

    // The envelope's own fields move into the context: nothing after this
    // reads them.
    let ctx = TaskContext {
        id: id.clone(),
        queue: std::mem::take(&mut envelope.queue),
        attempt,
        max_attempts: envelope.max_attempts,
        payload: std::mem::take(&mut envelope.payload),
        content_type: std::mem::take(&mut envelope.content_type),
        headers: std::mem::take(&mut envelope.headers),
        due_at: DateTime::from_timestamp_millis(envelope.due_at_ms).unwrap_or_default(),
        worker_id: inner.worker_id.clone(),
        cancelled: shutdown,
        note: Arc::default(),
    };
    let note = Arc::clone(&ctx.note);
    // Run in this task: a panic is caught all the same, and a worker stopped
    // hard drops the handler with it instead of leaving it running detached.
    let outcome = match AssertUnwindSafe(inner.handler.call(ctx))
        .catch_unwind()
        .await
    {
        Ok(outcome) => outcome,
        Err(_) => Err(HandlerError::retryable("handler panicked")),
    };
    let detail = note
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
        .unwrap_or_default();
    // The slot bounds running handlers; reporting and acknowledging the result
    // need not hold it (the unacknowledged message still counts against the
    // consumer's max_ack_pending).
    drop((slot, place.room));

    let (event, ack) = match outcome {
        Ok(()) => (
            finish(pb::AttemptResult::Succeeded, String::new(), None, detail),
            None,
        ),
        Err(err) if err.is_retryable() && attempt < envelope.max_attempts => {
            let delay = match &err {
                HandlerError::Retryable {
                    retry_after: Some(d),
                    ..
                } => *d,
                _ => backoff(
                    &inner.policy().with_task(envelope.backoff.as_ref()),
                    attempt,
                ),
            };
            let retry_at = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
            (
                finish(
                    pb::AttemptResult::Retrying,
                    err.message(),
                    Some(retry_at),
                    detail,
                ),
                Some(AckKind::Nak(Some(delay))),
            )
        }
        Err(err) => (
            finish(pb::AttemptResult::Dead, err.message(), None, detail),
            Some(AckKind::Term),
        ),
    };
    if matches!(ack, Some(AckKind::Term)) {
        Box::pin(keep_dead_letter(js, &id, msg.payload.clone())).await;
    }
    if reporter.send(event).await.is_err() {
        // Hard shutdown before the server recorded it: the redelivery settles it.
        return;
    }
    acker.ack(Arc::clone(msg), ack, id);
}

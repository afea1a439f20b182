//! Releases due tasks without ever cycling a waiting one.
//!
//! Each bucket (a window of due times, one subject) is dispatched by one
//! replica at a time, which holds a lease on it in Redis. The owner recreates
//! the bucket's durable consumer (so whatever a dead owner held comes back at
//! once), pulls all its messages into an in-memory timer and keeps them
//! unacknowledged. When a task is due (or due within the release lead: it
//! goes to the queue's ahead lane, and its worker holds it until the due
//! time) it publishes it to its queue with a stable message id, waits for
//! the publish acknowledgement, and only then acknowledges the bucket
//! message. Whether it runs is decided by the start
//! claim in Redis, when a worker asks to start it. A burst larger than the
//! release lead can carry starts to leave earlier (see [`Backlog`]).
//!
//! A bucket whose window starts further out than `body_prefetch` is held
//! without bodies: its waiting tasks cost no body memory. It is pulled
//! headers-only, or whole with each body dropped once read where tasks were
//! booked without headers ([`Pull`]). When its window comes near, its
//! consumer is recreated with bodies and delivers them all again.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use futures::{FutureExt as _, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::app::Recorder;
use crate::bus::{
    AheadLane, BucketMessage, BucketProgress, Bus, Interner, LANE_RECHECK, Pull, Unread,
    decode_bucket_message,
};
use crate::domain::{StatusWrite, bucket_of};
use crate::engine::backlog::{Backlog, Plan};
use crate::store::DynStore;
use crate::store::claims::{Claims, DispatchClaim};

/// Most tasks released in one round (one Lua call, one wave of publishes).
const MAX_RELEASE: usize = 4096;
/// Size of the first round after the timer was idle: a burst's first tasks
/// leave after a small claim and publish, then rounds double up to MAX_RELEASE.
const FIRST_RELEASE: usize = 64;
/// A burst (more than MAX_AHEAD tasks due at one instant) goes ahead within
/// the release lead only until QUIET_MS before its instant; what is left of
/// it then waits for the instant. Workers start the tasks they hold at the
/// due time, and a release round still running then (a burst that outran
/// the backlog's plan) would take the CPU the first starts need.
const MAX_AHEAD: usize = 64;
/// See MAX_AHEAD: several full rounds, with their SQL writes.
const QUIET_MS: i64 = 500;
/// The lead of a task booked less than the release lead before its due time.
/// Tasks due after it may have gone ahead already; it is released just before
/// its due time instead, and holds back the tasks due after it until then,
/// so a queue still gets its tasks in due order.
const LATE_LEAD_MS: i64 = 20;
/// How often the dispatcher asks again about an idle ahead lane it watches
/// (see [`Dispatcher::recheck_lanes`]).
const RECHECK_MS: i64 = LANE_RECHECK.as_millis() as i64;
/// How long a task waits before another try when a backend failed its release.
const RETRY_DELAY_MS: i64 = 1000;
/// Furthest ahead of the release lead a burst starts to leave (see
/// [`Backlog`]); at most half the body prefetch, so its bodies are loaded.
const MAX_BURST_LEAD_MS: i64 = 60_000;

/// Settings of the dispatcher.
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    /// Width of a bucket.
    pub width: Duration,
    /// How far ahead buckets are opened and their tasks held in memory.
    pub lookahead: Duration,
    /// Time-to-live of a bucket lease; a dead owner's buckets move after this.
    pub lease_ttl: Duration,
    /// How often leases are taken and renewed.
    pub tick: Duration,
    /// How often the stream is scanned for buckets with messages (late tasks).
    pub scan_every: Duration,
    /// How often each held bucket's consumer is compared with the tasks held
    /// of it (see [`Dispatcher::audit`]).
    pub audit_every: Duration,
    /// How long after its window a drained bucket is kept open, for clock skew.
    pub grace: Duration,
    /// How long before its window starts a bucket's task bodies are loaded;
    /// buckets further out are held without them (see [`Pull`]).
    pub body_prefetch: Duration,
    /// How long before its due time a task is released; its worker waits
    /// for the due time before it asks to start.
    pub release_lead: Duration,
    /// This replica's identity, the lease value.
    pub replica_id: String,
}

/// A task in the timer; a million of them wait at once, so every byte counts.
struct Held {
    generation: u64,
    msg: BucketMessage,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}
impl Held {
    fn key(&self) -> (i64, i64, u64) {
        (self.msg.due_ms, self.msg.bucket_ms, self.msg.seq)
    }

    fn bucket(&self) -> i64 {
        self.msg.bucket_ms
    }
}

/// When to ask again about a queue's idle ahead lane, and until when: the
/// last due time, less LATE_LEAD_MS, of its deferred tasks.
#[derive(Debug, Clone, Copy)]
struct Watch {
    next_ms: i64,
    until_ms: i64,
}

/// A bucket this replica holds the lease of.
struct Owned {
    /// Bumped on every (re)acquisition, so messages of an old puller are ignored.
    generation: u64,
    /// Ends with the way to pull the bucket again, if it must be reopened.
    puller: JoinHandle<Option<Pull>>,
    /// Tasks of this bucket in the timer, to know when it is drained.
    held: usize,
    last_renew: Instant,
    /// How it is pulled (see `DispatchSettings::body_prefetch`).
    pull: Pull,
    /// The consumer's progress at the last audit, if it had delivered more
    /// than the timer held then.
    short: Option<BucketProgress>,
}

/// The dispatcher loop of one replica.
pub struct Dispatcher {
    bus: Bus,
    claims: Claims,
    store: DynStore,
    recorder: Recorder,
    settings: DispatchSettings,
    width_ms: i64,
    lead_ms: i64,
    owned: HashMap<i64, Owned>,
    timer: BinaryHeap<Reverse<Held>>,
    /// The timer's tasks per slot of due time: when a burst must start to leave.
    backlog: Backlog,
    /// How far ahead of the release lead a burst may start to leave.
    burst_lead_ms: i64,
    /// Tasks released early whose queue's ahead lane no worker pulls: they
    /// wait for the due lane's lead (see [`due_lane_lead`]).
    deferred: BinaryHeap<Reverse<Held>>,
    /// Queues whose tasks were deferred while their ahead lane's consumer
    /// waited for a pull (see [`AheadLane::Idle`]): asked about again until
    /// a worker pulls it, when their deferred tasks go ahead after all.
    watching: HashMap<Arc<str>, Watch>,
    /// Tasks a backend failed to release, by when to try again; apart from
    /// the timer, so a retry keeps its due time (and so its lane).
    retrying: BinaryHeap<Reverse<(i64, Held)>>,
    known: BTreeSet<i64>,
    next_generation: u64,
    /// Size of the next release round (slow start, see FIRST_RELEASE).
    round: usize,
    /// The due instant of the tasks last released ahead, and how many of
    /// its tasks went ahead (see MAX_AHEAD and QUIET_MS).
    ahead: (i64, usize),
    tx: mpsc::Sender<(i64, u64, BucketMessage)>,
    rx: mpsc::Receiver<(i64, u64, BucketMessage)>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("settings", &self.settings)
            .field("owned", &self.owned.len())
            .field("held", &self.timer.len())
            .finish_non_exhaustive()
    }
}

impl Dispatcher {
    /// Creates a dispatcher over its backends.
    pub fn new(
        bus: Bus,
        claims: Claims,
        store: DynStore,
        recorder: Recorder,
        settings: DispatchSettings,
    ) -> Self {
        let (tx, rx) = mpsc::channel(65_536);
        let burst_lead_ms = (settings.body_prefetch.as_millis() as i64 / 2).min(MAX_BURST_LEAD_MS);
        Self {
            bus,
            claims,
            store,
            recorder,
            width_ms: settings.width.as_millis() as i64,
            lead_ms: settings.release_lead.as_millis() as i64,
            settings,
            owned: HashMap::new(),
            timer: BinaryHeap::new(),
            backlog: Backlog::default(),
            burst_lead_ms,
            deferred: BinaryHeap::new(),
            watching: HashMap::new(),
            retrying: BinaryHeap::new(),
            known: BTreeSet::new(),
            next_generation: 0,
            round: FIRST_RELEASE,
            ahead: (i64::MIN, 0),
            tx,
            rx,
        }
    }

    /// Runs until `shutdown`; then gives its leases back so other replicas take
    /// over at once, leaving held messages unacknowledged for them.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.settings.tick);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_scan: Option<Instant> = None;
        let mut last_audit = Instant::now();
        loop {
            let now_ms = Utc::now().timestamp_millis();
            let next_release = self.next_release(now_ms);
            let wake = async {
                match next_release {
                    Some(release_ms) => {
                        let wait = (release_ms - now_ms).max(0) as u64;
                        tokio::time::sleep(Duration::from_millis(wait)).await;
                    }
                    None => futures::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(first) = self.rx.recv() => {
                    self.hold(first);
                    while let Ok(next) = self.rx.try_recv() {
                        self.hold(next);
                    }
                }
                () = wake => self.release_due().await,
                _ = tick.tick() => {
                    let scan = last_scan.is_none_or(|t| t.elapsed() >= self.settings.scan_every);
                    if scan {
                        last_scan = Some(Instant::now());
                    }
                    let audit = last_audit.elapsed() >= self.settings.audit_every;
                    if audit {
                        last_audit = Instant::now();
                    }
                    self.manage_leases(scan, audit).await;
                }
            }
        }
        self.stop().await;
    }

    fn hold(&mut self, (bucket, generation, mut msg): (i64, u64, BucketMessage)) {
        match self.owned.get_mut(&bucket) {
            Some(owned) if owned.generation == generation => {
                owned.held += 1;
                // The puller's bucket, whatever the subject said.
                msg.bucket_ms = bucket;
                self.backlog.add(msg.due_ms);
                self.timer.push(Reverse(Held { generation, msg }));
            }
            // A message of a lost lease: its new owner redelivers it.
            _ => {}
        }
    }

    fn unhold(&mut self, bucket: i64, generation: u64) {
        if let Some(owned) = self.owned.get_mut(&bucket)
            && owned.generation == generation
        {
            owned.held = owned.held.saturating_sub(1);
        }
    }

    fn retry_later(&mut self, held: Held) {
        let at_ms = Utc::now().timestamp_millis() + RETRY_DELAY_MS;
        self.retrying.push(Reverse((at_ms, held)));
    }

    /// When the next release is due: the timer's first task at its own
    /// release time or when a burst must start to leave, whichever is first,
    /// the first deferred task at its own release time, or the first retry.
    fn next_release(&self, now_ms: i64) -> Option<i64> {
        let plan = self.plan(now_ms);
        let timer = self.timer.peek().map(|Reverse(h)| {
            let burst_ms = plan.release_ms(h.msg.due_ms, now_ms);
            release_at(
                h.msg.due_ms,
                lead_of(&h.msg, self.lead_ms),
                self.ahead,
                now_ms,
                burst_ms,
            )
        });
        let deferred = self.deferred.peek().map(|Reverse(h)| {
            release_at(
                h.msg.due_ms,
                due_lane_lead(&h.msg, self.lead_ms),
                self.ahead,
                now_ms,
                i64::MAX,
            )
        });
        let retry = self.retrying.peek().map(|Reverse((at_ms, _))| *at_ms);
        let watch = self.watching.values().map(|w| w.next_ms).min();
        timer
            .into_iter()
            .chain(deferred)
            .chain(retry)
            .chain(watch)
            .min()
    }

    /// When the timer's tasks must start to leave so that each goes a full
    /// lead before its due time (see [`Backlog`]).
    fn plan(&self, now_ms: i64) -> Plan {
        if self.lead_ms <= LATE_LEAD_MS {
            // No lead to speak of: nothing goes ahead, and no burst either.
            return Plan {
                start_ms: i64::MAX,
                through_ms: i64::MIN,
            };
        }
        self.backlog.plan(now_ms, self.lead_ms, self.burst_lead_ms)
    }

    /// Releases every task due within the release lead, oldest first, in
    /// rounds: a burst booked ahead leaves before its instant, and only the
    /// workers' part of each task is left for the instant itself.
    ///
    /// A task is published without a Redis claim of its own: its start claim,
    /// which no worker can skip, already decides whether it runs (cancelled,
    /// ended, started, expired or lost claims included). A release claim cost
    /// one Lua item per task to spare a publish in those rare cases. Only a
    /// task past its start deadline is claimed first, so that it ends EXPIRED
    /// without reaching its queue.
    async fn release_due(&mut self) {
        let now_ms = Utc::now().timestamp_millis();
        let mut due: Vec<Held> = Vec::new();
        let mut without_body = BTreeSet::new();
        let lead_ms = self.lead_ms;
        let plan = self.plan(now_ms);
        // A deferred task (no plan) waits for the due lane's lead.
        let releasable = |ahead, top: &Held, plan: Option<&Plan>| {
            let (lead, burst_ms) = match plan {
                Some(plan) => (
                    lead_of(&top.msg, lead_ms),
                    plan.release_ms(top.msg.due_ms, now_ms),
                ),
                None => (due_lane_lead(&top.msg, lead_ms), i64::MAX),
            };
            release_at(top.msg.due_ms, lead, ahead, now_ms, burst_ms) <= now_ms
        };
        // Tasks whose queue's ahead lane was just found pulled go first,
        // whatever the round's size: they are due soonest of all that go ahead.
        let mut found = self.recheck_lanes(now_ms).await.into_iter();
        loop {
            let retry = self.retrying.peek().map(|Reverse((at_ms, _))| *at_ms);
            let held = match (self.deferred.peek(), self.timer.peek()) {
                _ if let Some(held) = found.next() => held,
                _ if due.len() >= self.round => break,
                _ if retry.is_some_and(|at_ms| at_ms <= now_ms) => {
                    self.retrying.pop().expect("peeked").0.1
                }
                (Some(Reverse(top)), _) if releasable(self.ahead, top, None) => {
                    self.deferred.pop().expect("peeked").0
                }
                (_, Some(Reverse(top))) if releasable(self.ahead, top, Some(&plan)) => {
                    let Reverse(held) = self.timer.pop().expect("peeked");
                    let due_ms = held.msg.due_ms;
                    self.backlog.remove(due_ms);
                    if due_ms > now_ms {
                        self.ahead = match self.ahead {
                            (instant, n) if instant == due_ms => (instant, n + 1),
                            _ => (due_ms, 1),
                        };
                    }
                    held
                }
                _ => break,
            };
            let current = self
                .owned
                .get(&held.bucket())
                .is_some_and(|o| o.generation == held.generation);
            if current && held.msg.body.is_some() {
                due.push(held);
            } else if current {
                // Due before its bucket was reloaded (a stalled tick):
                // the reloaded consumer delivers it again, whole.
                without_body.insert(held.bucket());
            }
        }
        for bucket in without_body {
            self.load_bodies(bucket);
        }
        // More due after a full round: grow the next one; otherwise start small again.
        let more_due = self
            .timer
            .peek()
            .is_some_and(|Reverse(top)| releasable(self.ahead, top, Some(&plan)))
            || self
                .deferred
                .peek()
                .is_some_and(|Reverse(top)| releasable(self.ahead, top, None))
            || self
                .retrying
                .peek()
                .is_some_and(|Reverse((at_ms, _))| *at_ms <= now_ms);
        self.round = if more_due {
            (self.round * 2).min(MAX_RELEASE)
        } else {
            FIRST_RELEASE
        };
        let (late, ready): (Vec<Held>, Vec<Held>) = due
            .into_iter()
            .partition(|h| past_deadline(h.msg.expire_at_ms, now_ms));
        // Claims go one bucket hash per call; the rest of the round is one wave.
        let mut by_bucket: HashMap<i64, Vec<Held>> = HashMap::new();
        for held in late {
            by_bucket.entry(held.bucket()).or_default().push(held);
        }
        for (bucket, batch) in by_bucket {
            self.release_bucket(bucket, batch, now_ms, false).await;
        }
        self.publish(ready).await;
    }

    /// Claims tasks in Redis before it publishes them: those past their start
    /// deadline (so they end EXPIRED without reaching their queue) and, with
    /// `force`, those whose claim Redis lost.
    async fn release_bucket(&mut self, bucket: i64, batch: Vec<Held>, now_ms: i64, force: bool) {
        let id_text: Vec<String> = batch.iter().map(|h| h.msg.task_id.to_string()).collect();
        let ids: Vec<(&str, i64)> = id_text
            .iter()
            .zip(&batch)
            .map(|(id, h)| (id.as_str(), h.msg.expire_at_ms))
            .collect();
        let claims = match self
            .claims
            .dispatch(bucket, self.width_ms, now_ms, &ids, force)
            .await
        {
            Ok(claims) => claims,
            Err(err) => {
                // Late beats wrong: hold the tasks until Redis answers again.
                warn!(bucket, tasks = batch.len(), error = %err, "cannot claim due tasks; holding them");
                for held in batch {
                    self.retry_later(held);
                }
                return;
            }
        };
        let mut to_release = Vec::new();
        let mut missing = Vec::new();
        for (held, claim) in batch.into_iter().zip(claims) {
            match claim {
                DispatchClaim::Go => to_release.push(held),
                DispatchClaim::Missing => missing.push(held),
                DispatchClaim::Cancelled | DispatchClaim::Done => self.finish(held).await,
                DispatchClaim::Expired => {
                    self.recorder
                        .record_later(StatusWrite::Closed {
                            id: held.msg.task_id,
                            state: crate::domain::TaskState::Expired,
                            at: Utc::now(),
                        })
                        .await;
                    self.finish(held).await;
                }
            }
        }
        if !missing.is_empty() {
            self.recover_missing(bucket, missing, now_ms).await;
        }
        self.publish(to_release).await;
    }

    /// Handles due tasks whose Redis claim is gone: SQL says whether each may
    /// still run; those that may are claimed again with `force`.
    async fn recover_missing(&mut self, bucket: i64, missing: Vec<Held>, now_ms: i64) {
        let mut pending = Vec::new();
        for held in missing {
            let id = held.msg.task_id;
            match self.store.get_task(id).await {
                // Never accepted (its publish was undone), or already over.
                Ok(None) => self.finish(held).await,
                Ok(Some(task)) if task.state.is_final() => self.finish(held).await,
                Ok(Some(_)) => pending.push(held),
                Err(err) => {
                    warn!(%id, error = %err, "cannot check a task without claim; holding it");
                    self.retry_later(held);
                }
            }
        }
        if !pending.is_empty() {
            info!(
                bucket,
                tasks = pending.len(),
                "re-creating lost claims from sql"
            );
            Box::pin(self.release_bucket(bucket, pending, now_ms, true)).await;
        }
    }

    /// Watches the idle ahead lane of a deferred task's queue while the task
    /// could still go ahead.
    fn watch_lane(&mut self, msg: &BucketMessage, now_ms: i64) {
        let until_ms = msg.due_ms - LATE_LEAD_MS;
        self.watching
            .entry(msg.queue.clone())
            .and_modify(|w| w.until_ms = w.until_ms.max(until_ms))
            .or_insert(Watch {
                next_ms: now_ms + RECHECK_MS,
                until_ms,
            });
    }

    /// Asks again about the watched lanes due for it, and takes out of the
    /// deferred tasks those whose queue's ahead lane a worker now pulls and
    /// that can still go a full lead ahead: a read that fell between two of a
    /// worker's pulls, or a worker that had not found a new queue's lane yet,
    /// no longer sends them to the due lane at the last moment.
    async fn recheck_lanes(&mut self, now_ms: i64) -> Vec<Held> {
        let asked: Vec<Arc<str>> = self
            .watching
            .iter()
            .filter(|(_, w)| w.next_ms <= now_ms)
            .map(|(queue, _)| queue.clone())
            .collect();
        let mut pulled = HashSet::new();
        for queue in asked {
            let lane = self.bus.ahead_lane(&queue).await;
            match self.watching.get_mut(&queue) {
                Some(w) if lane == AheadLane::Idle && w.until_ms > now_ms => {
                    w.next_ms = now_ms + RECHECK_MS;
                }
                _ => {
                    self.watching.remove(&queue);
                    if lane == AheadLane::Pulled {
                        pulled.insert(queue);
                    }
                }
            }
        }
        self.take_deferred(&pulled, now_ms)
    }

    /// Takes out of the deferred tasks, in due order, those of `pulled`
    /// queues that can still go a full lead ahead.
    fn take_deferred(&mut self, pulled: &HashSet<Arc<str>>, now_ms: i64) -> Vec<Held> {
        if pulled.is_empty() {
            return Vec::new();
        }
        let (found, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.deferred)
            .into_iter()
            .partition(|Reverse(h)| {
                pulled.contains(&h.msg.queue) && goes_ahead(&h.msg, self.lead_ms, now_ms)
            });
        self.deferred = kept.into();
        let mut found: Vec<Held> = found.into_iter().map(|Reverse(h)| h).collect();
        found.sort_unstable();
        found
    }

    /// Publishes claimed tasks to their queues, then acknowledges the bucket
    /// messages whose publish JetStream acknowledged.
    async fn publish(&mut self, batch: Vec<Held>) {
        if batch.is_empty() {
            return;
        }
        // Which of its queue's two lanes each task goes to.
        let now_ms = Utc::now().timestamp_millis();
        let mut known: HashMap<Arc<str>, AheadLane> = HashMap::new();
        for held in &batch {
            if goes_ahead(&held.msg, self.lead_ms, now_ms) && !known.contains_key(&held.msg.queue) {
                let lane = self.bus.ahead_lane(&held.msg.queue).await;
                known.insert(held.msg.queue.clone(), lane);
            }
        }
        // A queue whose tasks were deferred while no worker pulled its ahead
        // lane, found pulled before the next recheck: its deferred tasks that
        // can still go ahead go first. Workers hold only so many of a lane's
        // tasks, in lane order, so a lane out of due order would leave tasks
        // due now waiting behind ones due later (a new queue's first second
        // under load started up to 1.1 s late).
        let pulled: HashSet<Arc<str>> = known
            .iter()
            .filter(|(queue, lane)| {
                **lane == AheadLane::Pulled && self.watching.contains_key(*queue)
            })
            .map(|(queue, _)| queue.clone())
            .collect();
        for queue in &pulled {
            self.watching.remove(queue);
        }
        let mut found = self.take_deferred(&pulled, now_ms);
        let batch = if found.is_empty() {
            batch
        } else {
            found.extend(batch);
            found
        };
        let mut lanes = Vec::with_capacity(batch.len());
        let mut sending = Vec::with_capacity(batch.len());
        for held in batch {
            let lane = if goes_ahead(&held.msg, self.lead_ms, now_ms) {
                known
                    .get(&held.msg.queue)
                    .copied()
                    .unwrap_or(AheadLane::Absent)
            } else {
                AheadLane::Absent
            };
            let ahead = lane == AheadLane::Pulled;
            if !ahead && held.msg.due_ms - due_lane_lead(&held.msg, self.lead_ms) > now_ms {
                // Only the ahead lane holds a task without a run slot until
                // its due time: on the queue's own subject it would take a
                // worker's run slot (or a limited queue's permit) for the
                // whole lead, and tasks due now would wait behind it.
                if lane == AheadLane::Idle {
                    self.watch_lane(&held.msg, now_ms);
                }
                self.deferred.push(Reverse(held));
                continue;
            }
            lanes.push(ahead);
            sending.push(held);
        }
        // A wave holds at most MAX_RELEASE acknowledgements: each keeps one
        // of the JetStream context's in-flight permits until awaited, and a
        // release waiting for a permit the dispatcher itself held would wait
        // for ever. The deferred tasks found at once can outnumber them all.
        let mut lanes = lanes.into_iter();
        let mut sending = sending.into_iter().peekable();
        while sending.peek().is_some() {
            let wave: Vec<Held> = sending.by_ref().take(MAX_RELEASE).collect();
            let wave_lanes: Vec<bool> = lanes.by_ref().take(wave.len()).collect();
            self.send(wave, wave_lanes).await;
        }
    }

    /// Publishes a wave of tasks to their lanes (`lanes`: ahead or not, per
    /// task), then acknowledges the bucket messages whose publish JetStream
    /// acknowledged.
    async fn send(&mut self, batch: Vec<Held>, lanes: Vec<bool>) {
        let mut acks = Vec::with_capacity(batch.len());
        for (held, ahead) in batch.iter().zip(lanes) {
            // release_due lets only tasks with a body through.
            acks.push(match &held.msg.body {
                Some(body) => self
                    .bus
                    .release(&held.msg, Bytes::copy_from_slice(body), ahead)
                    .await
                    .map_err(|e| e.to_string()),
                None => Err("held without its body".to_owned()),
            });
        }
        let mut waits = Vec::with_capacity(acks.len());
        for ack in acks {
            waits.push(async move {
                match ack {
                    Ok(future) => future.await.map(drop).map_err(|e| e.to_string()),
                    Err(err) => Err(err),
                }
            });
        }
        let results = futures::future::join_all(waits).await;
        let now = Utc::now();
        let now_ms = now.timestamp_millis();
        for (held, result) in batch.into_iter().zip(results) {
            match result {
                Ok(()) => {
                    let write = StatusWrite::Dispatched {
                        id: held.msg.task_id,
                        at: now,
                    };
                    // A burst's releases ahead are written now, before its
                    // instant; a lone task's may still fold into its start.
                    if is_burst(self.ahead, held.msg.due_ms) && held.msg.due_ms > now_ms {
                        self.recorder.record_ahead(write).await;
                    } else {
                        self.recorder.record_later(write).await;
                    }
                    self.finish(held).await;
                }
                Err(err) => {
                    warn!(task_id = %held.msg.task_id, error = %err, "release not acknowledged; retrying");
                    self.retry_later(held);
                }
            }
        }
    }

    /// Acknowledges a bucket message: the task has left the bucket for good.
    async fn finish(&mut self, held: Held) {
        self.unhold(held.bucket(), held.generation);
        if let Err(err) = self.bus.ack(held.msg.ack_subject()).await {
            // The message comes back after ack_wait; the claim makes that copy harmless.
            debug!(task_id = %held.msg.task_id, error = %err, "bucket ack failed");
        }
    }

    /// Takes leases of buckets that are open or have late tasks, renews held
    /// ones, drops lost ones, closes drained past ones and, with `audit`,
    /// audits the others.
    async fn manage_leases(&mut self, scan: bool, audit: bool) {
        let now_ms = Utc::now().timestamp_millis();
        if scan {
            match self.bus.buckets_with_messages().await {
                Ok(found) => self.known.extend(found),
                Err(err) => warn!(error = %err, "cannot list buckets"),
            }
        }
        let horizon = now_ms + self.settings.lookahead.as_millis() as i64;
        let mut wanted: BTreeSet<i64> = self.known.range(..=horizon).copied().collect();
        let mut bucket = bucket_of(now_ms, self.width_ms);
        while bucket <= horizon {
            wanted.insert(bucket);
            bucket += self.width_ms;
        }

        for bucket in wanted {
            if !self.owned.contains_key(&bucket) {
                match self
                    .claims
                    .lease(bucket, &self.settings.replica_id, self.settings.lease_ttl)
                    .await
                {
                    Ok(true) => self.open(bucket),
                    Ok(false) => {}
                    Err(err) => {
                        debug!(bucket, error = %err, "cannot take bucket lease");
                        break;
                    }
                }
            }
        }

        let renew_every = self.settings.lease_ttl / 3;
        let grace_ms = self.settings.grace.as_millis() as i64;
        let prefetch_ms = self.settings.body_prefetch.as_millis() as i64;
        let buckets: Vec<i64> = self.owned.keys().copied().collect();
        for bucket in buckets {
            let owned = self.owned.get_mut(&bucket).expect("listed above");
            if owned.puller.is_finished() {
                // Reopened at once, even when past (closed, a past bucket
                // would wait for the next scan). What the old consumer
                // delivered leaves the timer: the new one delivers it again.
                let pull = match (&mut owned.puller).now_or_never() {
                    Some(Ok(Some(pull))) => pull,
                    _ => {
                        info!(bucket, "bucket puller stopped; reopening");
                        owned.pull
                    }
                };
                self.reload(bucket, pull);
                continue;
            }
            if owned.last_renew.elapsed() >= renew_every {
                match self
                    .claims
                    .lease(bucket, &self.settings.replica_id, self.settings.lease_ttl)
                    .await
                {
                    Ok(true) => {
                        if let Some(o) = self.owned.get_mut(&bucket) {
                            o.last_renew = Instant::now();
                        }
                    }
                    Ok(false) => {
                        warn!(bucket, "bucket lease lost to another replica");
                        self.close(bucket);
                        continue;
                    }
                    Err(err) => debug!(bucket, error = %err, "cannot renew bucket lease"),
                }
            }
            let owned = &self.owned[&bucket];
            if !owned.pull.keeps_bodies() && bucket - now_ms <= prefetch_ms {
                self.load_bodies(bucket);
                continue;
            }
            // One read of the consumer serves both the drained check and the audit.
            let past_empty = owned.held == 0 && bucket + self.width_ms + grace_ms < now_ms;
            if !past_empty && !audit {
                continue;
            }
            let progress = match self.bus.bucket_progress(bucket).await {
                Ok(Some(progress)) => progress,
                // Gone: its puller notices and the bucket is reopened.
                Ok(None) => continue,
                Err(err) => {
                    debug!(bucket, error = %err, "cannot check bucket");
                    continue;
                }
            };
            if past_empty && progress.drained() {
                self.close(bucket);
                self.known.remove(&bucket);
                if let Err(err) = self.bus.delete_bucket_consumer(bucket).await {
                    debug!(bucket, error = %err, "cannot delete drained bucket consumer");
                }
                let _ = self
                    .claims
                    .release_lease(bucket, &self.settings.replica_id)
                    .await;
                debug!(bucket, "bucket drained and closed");
            } else if audit {
                self.audit(bucket, progress);
            }
        }
    }

    /// Compares a bucket's consumer with the tasks held of it. Every message
    /// the consumer delivered stays unacknowledged until its task left, so
    /// the consumer can count more only for a message that never reached the
    /// timer (lost between nats-server and the puller) or whose
    /// acknowledgement was lost; either would wait for the consumer's
    /// ack_wait (bucket width + look-ahead + 5 minutes). The same shortfall at two audits in a row,
    /// with nothing delivered or acknowledged in between and nothing waiting
    /// in the puller's channel, reloads the bucket: its fresh consumer
    /// delivers every task not yet released again, and the start claim makes
    /// a second copy of a released one harmless.
    fn audit(&mut self, bucket: i64, progress: BucketProgress) {
        let idle = self.rx.is_empty();
        let Some(owned) = self.owned.get_mut(&bucket) else {
            return;
        };
        let short =
            idle && progress.undelivered == 0 && progress.unacknowledged > owned.held as u64;
        if !short {
            owned.short = None;
            return;
        }
        if owned.short != Some(progress) {
            owned.short = Some(progress);
            return;
        }
        warn!(
            bucket,
            unacknowledged = progress.unacknowledged,
            held = owned.held,
            "bucket consumer delivered tasks this replica does not hold; reloading the bucket"
        );
        let pull = owned.pull;
        self.reload(bucket, pull);
    }

    /// Starts pulling a bucket whose lease this replica just took.
    fn open(&mut self, bucket: i64) {
        let far_ms = bucket - Utc::now().timestamp_millis();
        let pull = if far_ms <= self.settings.body_prefetch.as_millis() as i64 {
            Pull::Whole
        } else if self.bus.books_with_headers() {
            Pull::Headers
        } else {
            Pull::Lean
        };
        self.open_with(bucket, pull, Instant::now());
    }

    fn open_with(&mut self, bucket: i64, mode: Pull, last_renew: Instant) {
        self.next_generation += 1;
        let generation = self.next_generation;
        let ack_wait = self.settings.width + self.settings.lookahead + Duration::from_secs(300);
        let puller = tokio::spawn(pull(
            self.bus.clone(),
            bucket,
            generation,
            ack_wait,
            mode,
            self.tx.clone(),
        ));
        debug!(bucket, generation, ?mode, "bucket opened");
        self.owned.insert(
            bucket,
            Owned {
                generation,
                puller,
                held: 0,
                last_renew,
                pull: mode,
                short: None,
            },
        );
    }

    /// Reopens a bucket held without bodies with them: the new consumer
    /// delivers every task not yet released again, whole.
    fn load_bodies(&mut self, bucket: i64) {
        if self
            .owned
            .get(&bucket)
            .is_some_and(|o| !o.pull.keeps_bodies())
        {
            self.reload(bucket, Pull::Whole);
        }
    }

    /// Reopens a bucket this replica holds with a fresh consumer, which
    /// delivers every task not yet released again; the old generation's
    /// entries leave the timer at once rather than when they fall due.
    fn reload(&mut self, bucket: i64, pull: Pull) {
        let Some(owned) = self.owned.get(&bucket) else {
            return;
        };
        let (generation, last_renew) = (owned.generation, owned.last_renew);
        self.close(bucket);
        let backlog = &mut self.backlog;
        self.timer.retain(|Reverse(h)| {
            let keep = h.bucket() != bucket || h.generation != generation;
            if !keep {
                backlog.remove(h.msg.due_ms);
            }
            keep
        });
        debug!(bucket, ?pull, "reloading a bucket");
        self.open_with(bucket, pull, last_renew);
    }

    fn close(&mut self, bucket: i64) {
        if let Some(owned) = self.owned.remove(&bucket) {
            owned.puller.abort();
        }
    }

    async fn stop(&mut self) {
        let buckets: Vec<i64> = self.owned.keys().copied().collect();
        for bucket in buckets {
            self.close(bucket);
            let _ = self
                .claims
                .release_lease(bucket, &self.settings.replica_id)
                .await;
        }
        self.timer.clear();
        self.deferred.clear();
        self.watching.clear();
        self.retrying.clear();
        self.backlog.clear();
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        // A replica killed mid-way must not leave pullers feeding nobody.
        for owned in self.owned.values() {
            owned.puller.abort();
        }
    }
}

/// Pulls every message of one bucket into the dispatcher. Ends when the
/// bucket must be reopened; with how to pull it where that changes.
async fn pull(
    bus: Bus,
    bucket: i64,
    generation: u64,
    ack_wait: Duration,
    mode: Pull,
    tx: mpsc::Sender<(i64, u64, BucketMessage)>,
) -> Option<Pull> {
    let consumer = match bus
        .reset_bucket_consumer(bucket, ack_wait, mode.headers_only())
        .await
    {
        Ok(consumer) => consumer,
        Err(err) => {
            warn!(bucket, error = %err, "cannot create bucket consumer");
            tokio::time::sleep(Duration::from_secs(1)).await;
            return None;
        }
    };
    let mut messages = match consumer
        .stream()
        .max_messages_per_batch(1000)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
    {
        Ok(messages) => messages,
        Err(err) => {
            warn!(bucket, error = %err, "cannot pull bucket");
            tokio::time::sleep(Duration::from_secs(1)).await;
            return None;
        }
    };
    let mut shared = Interner::default();
    let mut connections = bus.connections();
    loop {
        // Messages first: while they flow, the watch is never polled, so
        // it adds no waiter registration per message.
        let next = tokio::select! {
            biased;
            next = messages.next() => next,
            Ok(()) = connections.changed() => {
                if bus.bucket_consumer_lost_on_reconnect(bucket).await {
                    warn!(bucket, "bucket consumer lost with a NATS restart; reopening the bucket");
                    return None;
                }
                continue;
            }
        };
        let Some(next) = next else { break };
        match next {
            Ok(msg) => match decode_bucket_message(msg, &mut shared, mode) {
                Ok(msg) => {
                    if tx.send((bucket, generation, msg)).await.is_err() {
                        return None;
                    }
                }
                Err(Unread::NeedsBody) => {
                    // Booked without headers (by this version, or another
                    // replica): only the envelope tells the task.
                    debug!(
                        bucket,
                        "tasks booked without headers; pulling the bucket lean"
                    );
                    return Some(Pull::Lean);
                }
                Err(Unread::Malformed(reason, reply)) => {
                    warn!(bucket, reason, "malformed task message terminated");
                    if let Some(reply) = reply {
                        let _ = bus.term(&reply).await;
                    }
                }
            },
            Err(err) => {
                debug!(bucket, error = %err, "bucket pull interrupted");
                if bus.bucket_consumer_lost(bucket, &err).await {
                    // Ending makes the dispatcher reopen the bucket with a fresh consumer.
                    warn!(bucket, "bucket consumer lost; reopening the bucket");
                    return None;
                }
            }
        }
    }
    None
}

/// The release lead of one task: `lead_ms`, or LATE_LEAD_MS (at most
/// `lead_ms`) for a task booked less than `lead_ms` before its due time.
fn lead_of(msg: &BucketMessage, lead_ms: i64) -> i64 {
    late_lead(msg.due_ms, msg.booked_ms(), lead_ms)
}

/// How long before its due time a task goes to its queue's own subject:
/// what a late booking gets, so that a worker takes it up as it falls due.
fn due_lane_lead(msg: &BucketMessage, lead_ms: i64) -> i64 {
    lead_of(msg, lead_ms).min(LATE_LEAD_MS)
}

/// Whether a task's start deadline (`expire_at_ms`, 0 for none) has passed.
fn past_deadline(expire_at_ms: i64, now_ms: i64) -> bool {
    expire_at_ms > 0 && now_ms > expire_at_ms
}

fn late_lead(due_ms: i64, booked_ms: Option<i64>, lead_ms: i64) -> i64 {
    match booked_ms {
        Some(booked) if due_ms - booked < lead_ms => lead_ms.min(LATE_LEAD_MS),
        _ => lead_ms,
    }
}

/// Whether a task released at `now_ms` goes to its queue's ahead lane: it
/// is released a full lead before its due time. A task booked within the
/// lead, or released no earlier than a late booking would be, goes to the
/// queue's own subject, which workers serve first, so it never waits behind
/// what went ahead.
fn goes_ahead(msg: &BucketMessage, lead_ms: i64, now_ms: i64) -> bool {
    full_lead(msg.due_ms, msg.booked_ms(), lead_ms, now_ms)
}

/// See [`goes_ahead`].
fn full_lead(due_ms: i64, booked_ms: Option<i64>, lead_ms: i64, now_ms: i64) -> bool {
    lead_ms > LATE_LEAD_MS
        && due_ms - now_ms > LATE_LEAD_MS
        && late_lead(due_ms, booked_ms, lead_ms) == lead_ms
}

/// Whether the instant `due_ms` is a burst: MAX_AHEAD of its tasks went
/// ahead already (per `ahead`, the instant last released ahead and its count).
fn is_burst(ahead: (i64, usize), due_ms: i64) -> bool {
    ahead.0 == due_ms && ahead.1 >= MAX_AHEAD
}

/// When a task due at `due_ms` may be released, seen at `now_ms`: `lead_ms`
/// ahead, or at `burst_ms` if the backlog's plan has it leave earlier,
/// unless its instant is a burst (MAX_AHEAD of its tasks went ahead, per
/// `ahead`) that is less than QUIET_MS away.
fn release_at(due_ms: i64, lead_ms: i64, ahead: (i64, usize), now_ms: i64, burst_ms: i64) -> i64 {
    if is_burst(ahead, due_ms) && now_ms > due_ms - QUIET_MS {
        due_ms
    } else {
        (due_ms - lead_ms).min(burst_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_goes_ahead_until_shortly_before_its_instant() {
        let (due, lead) = (1_000_000, 2_000);
        let early = due - lead;
        let quiet = due - QUIET_MS + 1;
        const NONE: i64 = i64::MAX;
        // Within the lead and outside the quiet stretch, a burst goes ahead whole.
        assert_eq!(
            release_at(due, lead, (due, MAX_AHEAD * 100), early, NONE),
            early
        );
        // In the quiet stretch, only an instant's first tasks still go ahead.
        assert_eq!(release_at(due, lead, (i64::MIN, 0), quiet, NONE), early);
        assert_eq!(
            release_at(due, lead, (due, MAX_AHEAD - 1), quiet, NONE),
            early
        );
        assert_eq!(release_at(due, lead, (due, MAX_AHEAD), quiet, NONE), due);
        // Another instant's tasks still go ahead.
        assert_eq!(
            release_at(due + 1, lead, (due, MAX_AHEAD), quiet, NONE),
            due + 1 - lead
        );
        // A burst planned to start further ahead starts then, but not in
        // the quiet stretch.
        let planned = due - lead - 10_000;
        assert_eq!(
            release_at(due, lead, (due, MAX_AHEAD), early, planned),
            planned
        );
        assert_eq!(release_at(due, lead, (due, MAX_AHEAD), quiet, planned), due);
        // A lead shorter than the quiet stretch: a burst's first tasks only.
        assert_eq!(release_at(due, 20, (due, MAX_AHEAD), due - 20, NONE), due);
    }

    #[test]
    fn a_task_booked_within_the_lead_goes_just_before_its_due_time() {
        let (due, lead) = (1_000_000, 2_000);
        assert_eq!(late_lead(due, Some(due - lead), lead), lead);
        assert_eq!(late_lead(due, None, lead), lead);
        assert_eq!(late_lead(due, Some(due - lead + 1), lead), LATE_LEAD_MS);
        assert_eq!(late_lead(due, Some(due - 5), 0), 0);
    }

    #[test]
    fn only_a_task_released_a_full_lead_ahead_takes_the_ahead_lane() {
        let (due, lead) = (1_000_000, 2_000);
        let booked = Some(due - 60_000);
        assert!(full_lead(due, booked, lead, due - lead));
        assert!(full_lead(due, None, lead, due - LATE_LEAD_MS - 1));
        // Released as late as a late booking (deferred, or a dispatcher that
        // fell behind): on the due lane, not behind what went ahead.
        assert!(!full_lead(due, booked, lead, due - LATE_LEAD_MS));
        // Booked within the lead: released 20 ms ahead, on the due lane.
        assert!(!full_lead(
            due,
            Some(due - lead + 1),
            lead,
            due - LATE_LEAD_MS
        ));
        // Released at or after its due time (a burst's remainder, a retry).
        assert!(!full_lead(due, booked, lead, due));
        assert!(!full_lead(due, booked, lead, due + 5));
        // No lead to speak of: one lane.
        assert!(!full_lead(due, booked, LATE_LEAD_MS, due - 10));
    }

    /// A million of these wait at once (the idle goal is 300 MB for them all).
    /// Nothing of a held task lives on the heap but its body, which a bucket
    /// far from due does not load.
    #[test]
    fn a_held_task_stays_small() {
        let size = std::mem::size_of::<Held>();
        assert!(size <= 136, "Held grew to {size} bytes");
    }
}

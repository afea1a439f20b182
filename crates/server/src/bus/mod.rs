//! JetStream I/O: the two streams, publishing waiting tasks into buckets,
//! releasing due tasks to their queues, and per-bucket consumers.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::header::HeaderName;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::consumer::pull::{MessagesError, MessagesErrorKind};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::stream::ConsumerErrorKind;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::TryStreamExt;
use kairos_proto::v1 as pb;
use kairos_proto::wire;
use prost::Message as _;

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::Subject;

use crate::domain::{NewTask, Queue, TaskId};

mod bucket;
mod fast;
pub use bucket::{AckSubject, BucketMessage, Interner, Pull, Unread, decode_bucket_message};

/// Errors talking to NATS.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// NATS could not be reached, or JetStream refused the request.
    #[error("nats unavailable: {0}")]
    Unavailable(String),
}

impl BusError {
    fn from_any(err: impl std::fmt::Display) -> Self {
        Self::Unavailable(err.to_string())
    }
}

/// What a bucket's consumer has delivered and had acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketProgress {
    /// Messages not yet delivered.
    pub undelivered: u64,
    /// Messages delivered and not yet acknowledged.
    pub unacknowledged: u64,
    /// Stream sequence of the last message delivered.
    pub delivered: u64,
    /// Stream sequence below which every message is acknowledged.
    pub ack_floor: u64,
}

impl BucketProgress {
    /// Whether the bucket has nothing left to deliver or acknowledge.
    pub fn drained(&self) -> bool {
        self.undelivered == 0 && self.unacknowledged == 0
    }
}

/// Result of a bus operation.
pub type BusResult<T> = Result<T, BusError>;

/// Stream settings taken from the server config.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// Replicas of each stream (1 on a single NATS server).
    pub replicas: usize,
    /// JetStream duplicate window for message ids.
    pub duplicate_window: Duration,
    /// How long dead tasks' envelopes are kept for RetryTask.
    pub dead_retention: Duration,
    /// How several new tasks are published at once.
    pub batch_publish: BatchPublish,
    /// Whether new tasks also carry their id, due time, queue and expiry as
    /// NATS headers, which replicas before this version need to read them.
    pub booking_headers: bool,
}

/// How a replica publishes several new tasks at once, where the NATS
/// server can; otherwise it falls back to atomic batches (2.12+), then to
/// one acknowledged publish per task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BatchPublish {
    /// Whichever of the two a trial at startup finds quicker on this NATS.
    Auto,
    /// Fast-ingest batches (nats-server 2.14+), the quickest with NATS's
    /// default sync; with `sync_interval: always` NATS syncs every message.
    Fast,
    /// Atomic batches (nats-server 2.12+), one sync per batch: for
    /// `sync_interval: always`.
    Atomic,
}

/// What the tasks stream takes, as [`Bus::batches`] holds it.
const ONE_BY_ONE: u8 = 0;
const ATOMIC: u8 = 1;
const FAST: u8 = 2;

/// The JetStream side of Kairos. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Bus {
    client: async_nats::Client,
    js: jetstream::Context,
    /// How several tasks are published: ONE_BY_ONE, ATOMIC or FAST.
    batches: Arc<std::sync::atomic::AtomicU8>,
    /// Whether new tasks carry headers (see [`StreamSettings::booking_headers`]).
    booking_headers: Arc<std::sync::atomic::AtomicBool>,
    /// Batches in flight; the server allows 50 atomic ones per stream.
    batch_slots: Arc<tokio::sync::Semaphore>,
    /// Calls of [`Bus::publish_each`] under way (see EACH_IN_FLIGHT).
    each_slots: Arc<tokio::sync::Semaphore>,
    /// Per queue: whether a worker pulls its ahead lane.
    lanes: Arc<std::sync::Mutex<HashMap<String, Lane>>>,
    /// Counts the client's connections to NATS, so that pullers can check
    /// at once after a reconnect whether a restarted server lost their
    /// consumers (see [`Bus::connections`]).
    connections: Arc<tokio::sync::watch::Sender<u64>>,
}

/// What a replica knows of whether workers pull a queue's ahead lane
/// (see [`Bus::ahead_lane`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AheadLane {
    /// A worker pulls it, or was seen pulling it within LANE_GRACE.
    Pulled,
    /// Its consumer is there but no worker was seen pulling it lately: none
    /// may know it (an older or foreign worker), or one is still finding it.
    Idle,
    /// It has no consumer (a queue with a concurrency limit), is paused, or
    /// could not be read.
    Absent,
}

/// What a replica last read of a queue's ahead lane.
#[derive(Debug)]
struct Lane {
    /// What the last read saw.
    seen: AheadLane,
    read_at: std::time::Instant,
    /// When a read last saw a worker pulling.
    pulled_at: Option<std::time::Instant>,
    /// A read is under way in the background.
    reading: bool,
}

impl Lane {
    fn unread() -> Self {
        Self {
            seen: AheadLane::Absent,
            read_at: std::time::Instant::now(),
            pulled_at: None,
            reading: false,
        }
    }

    /// Records a read.
    fn update(&mut self, seen: AheadLane) {
        let now = std::time::Instant::now();
        self.seen = seen;
        self.read_at = now;
        self.reading = false;
        if seen == AheadLane::Pulled {
            self.pulled_at = Some(now);
        }
    }

    /// What the reads say: a worker ends each pull and asks again, and a
    /// read that falls between the two sees nobody waiting, so a lane seen
    /// pulled a moment ago still counts as pulled.
    fn state(&self) -> AheadLane {
        match self.seen {
            AheadLane::Idle if self.pulled_at.is_some_and(|at| at.elapsed() < LANE_GRACE) => {
                AheadLane::Pulled
            }
            seen => seen,
        }
    }

    /// Whether the last read is recent enough to answer from: an idle lane
    /// is read again sooner, so a worker that just came is seen quickly.
    fn fresh(&self) -> bool {
        let ttl = match self.state() {
            AheadLane::Idle => LANE_RECHECK,
            AheadLane::Pulled | AheadLane::Absent => LANE_TTL,
        };
        self.read_at.elapsed() < ttl
    }
}

/// How long the dispatcher trusts what it read of a queue's ahead lane.
const LANE_TTL: Duration = Duration::from_secs(2);
/// How long it trusts a read that saw the lane's consumer with nobody
/// pulling it.
pub const LANE_RECHECK: Duration = Duration::from_millis(200);
/// How long a lane seen pulled counts as pulled while reads see nobody
/// waiting: more than two of a worker's 2 s pulls.
const LANE_GRACE: Duration = Duration::from_secs(5);

/// Most messages in one atomic batch (the server's limit).
const ATOMIC_MAX_MESSAGES: usize = 1000;
/// Most body bytes in one atomic batch: the server stages a batch in memory
/// until its commit.
const ATOMIC_MAX_BYTES: usize = 4 << 20;
/// Messages in each batch of the startup trial ([`Bus::try_batches`]).
const TRIAL_MESSAGES: usize = 400;
/// Atomic batches in flight at once, below the server's 50 per stream.
const ATOMIC_IN_FLIGHT: usize = 32;
/// The JetStream context's in-flight permits: a publish holds one until its
/// acknowledgement is awaited (or dropped), and a publish without a free one
/// waits for it.
const ACKS_IN_FLIGHT: usize = 20_000;
/// ScheduleBatch calls publishing one message per task at once. Each holds
/// up to 1,000 of the ACKS_IN_FLIGHT permits until it awaits its
/// acknowledgements: together with the dispatcher's waves (at most 4,096)
/// they stay below it, so no caller waits for a permit others hold while
/// they wait too.
const EACH_IN_FLIGHT: usize = 8;

/// The commit's answer: a publish acknowledgement for the whole batch, or an error.
#[derive(Debug, serde::Deserialize)]
struct BatchAck {
    #[serde(default)]
    count: Option<u64>,
    #[serde(default)]
    error: Option<BatchAckError>,
}

#[derive(Debug, serde::Deserialize)]
struct BatchAckError {
    #[serde(default)]
    description: String,
}

impl Bus {
    /// Connects to NATS; the client reconnects by itself after an outage.
    pub async fn connect(url: &str, name: &str) -> BusResult<Self> {
        let connections = Arc::new(tokio::sync::watch::Sender::new(0_u64));
        let counter = connections.clone();
        let client = async_nats::ConnectOptions::new()
            .name(name)
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(3))
            .event_callback(move |event| {
                let counter = counter.clone();
                async move {
                    if matches!(event, async_nats::Event::Connected) {
                        counter.send_modify(|n| *n += 1);
                    }
                }
            })
            .connect(url)
            .await
            .map_err(BusError::from_any)?;
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(5))
            .max_ack_inflight(ACKS_IN_FLIGHT)
            .build(client.clone());
        Ok(Self {
            client,
            js,
            batches: Arc::new(std::sync::atomic::AtomicU8::new(ONE_BY_ONE)),
            booking_headers: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            batch_slots: Arc::new(tokio::sync::Semaphore::new(ATOMIC_IN_FLIGHT)),
            each_slots: Arc::new(tokio::sync::Semaphore::new(EACH_IN_FLIGHT)),
            lanes: Arc::default(),
            connections,
        })
    }

    /// Changes each time the client connects to NATS again from now on.
    pub fn connections(&self) -> tokio::sync::watch::Receiver<u64> {
        self.connections.subscribe()
    }

    /// Whether this replica books tasks with headers, so that a far bucket
    /// of its own tasks can be pulled headers-only.
    pub fn books_with_headers(&self) -> bool {
        self.booking_headers
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Returns the NATS client, e.g. to flush on shutdown.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Creates both streams if they do not exist (file storage, work-queue
    /// retention), and turns on atomic and fast batches for the tasks stream
    /// where the server has them.
    pub async fn ensure_streams(&self, settings: &StreamSettings) -> BusResult<()> {
        self.booking_headers.store(
            settings.booking_headers,
            std::sync::atomic::Ordering::Relaxed,
        );
        // Dead letters: the last envelope of each dead task, for RetryTask.
        self.js
            .get_or_create_stream(stream::Config {
                name: wire::DEAD_STREAM.to_owned(),
                subjects: vec![format!("{}.>", wire::DEAD_SUBJECT_PREFIX)],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                num_replicas: settings.replicas,
                max_age: settings.dead_retention,
                max_messages_per_subject: 1,
                ..Default::default()
            })
            .await
            .map_err(BusError::from_any)?;
        for (name, subject) in [
            (
                wire::TASKS_STREAM,
                format!("{}.>", wire::TASKS_SUBJECT_PREFIX),
            ),
            (
                wire::READY_STREAM,
                format!("{}.>", wire::READY_SUBJECT_PREFIX),
            ),
        ] {
            let mut stream = self
                .js
                .get_or_create_stream(stream::Config {
                    name: name.to_owned(),
                    subjects: vec![subject],
                    retention: stream::RetentionPolicy::WorkQueue,
                    storage: stream::StorageType::File,
                    num_replicas: settings.replicas,
                    duplicate_window: settings.duplicate_window,
                    allow_atomic_publish: name == wire::TASKS_STREAM,
                    allow_batch_publish: name == wire::TASKS_STREAM,
                    ..Default::default()
                })
                .await
                .map_err(BusError::from_any)?;
            if name != wire::TASKS_STREAM {
                continue;
            }
            let mut config = stream
                .info()
                .await
                .map_err(BusError::from_any)?
                .config
                .clone();
            if !config.allow_atomic_publish || !config.allow_batch_publish {
                // A stream made by an older Kairos, or a server before 2.14
                // (which drops the settings it does not know).
                config.allow_atomic_publish = true;
                config.allow_batch_publish = true;
                if let Err(err) = self.js.update_stream(config).await {
                    tracing::info!(error = %err, "batch publishing unavailable");
                }
                config = stream
                    .info()
                    .await
                    .map_err(BusError::from_any)?
                    .config
                    .clone();
            }
            let fast = config.allow_batch_publish && fast::inbox_fits(&self.client);
            let mode = match settings.batch_publish {
                BatchPublish::Auto if fast && config.allow_atomic_publish => {
                    self.try_batches(settings.replicas).await
                }
                BatchPublish::Auto | BatchPublish::Fast if fast => FAST,
                _ if config.allow_atomic_publish => ATOMIC,
                _ => ONE_BY_ONE,
            };
            if mode == ONE_BY_ONE {
                tracing::info!("batch publishing unavailable; publishing tasks one by one");
            }
            self.batches
                .store(mode, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// Times a fast and an atomic batch on a scratch stream and returns the
    /// quicker way: NATS with `sync_interval: always` syncs each message of a
    /// fast batch (the trial measured it 5-6 × slower than an atomic one),
    /// while with its default sync a fast batch took half as long, and fast
    /// batches go further under load (BENCHMARKS.md item 45). Atomic when
    /// the trial fails.
    async fn try_batches(&self, replicas: usize) -> u8 {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let name = format!("KAIROS_TRIAL_{id}");
        let subject: Subject = format!("kairos.trial.{id}").into();
        let trial = async {
            self.js
                .create_stream(stream::Config {
                    name: name.clone(),
                    subjects: vec![subject.to_string()],
                    storage: stream::StorageType::File,
                    num_replicas: replicas,
                    allow_atomic_publish: true,
                    allow_batch_publish: true,
                    ..Default::default()
                })
                .await
                .map_err(BusError::from_any)?;
            let batch = || {
                (0..TRIAL_MESSAGES)
                    .map(|_| {
                        (
                            subject.clone(),
                            HeaderMap::new(),
                            Bytes::from_static(&[0; 256]),
                        )
                    })
                    .collect::<Vec<_>>()
            };
            let (mut fast, mut atomic) = (Duration::MAX, Duration::MAX);
            // Twice each, keeping the quicker, so a first-time cost on
            // either side does not decide.
            for _ in 0..2 {
                let started = std::time::Instant::now();
                self.publish_atomic(batch()).await?;
                atomic = atomic.min(started.elapsed());
                let started = std::time::Instant::now();
                fast::publish(&self.client, batch()).await?;
                fast = fast.min(started.elapsed());
            }
            Ok::<_, BusError>((fast, atomic))
        };
        let outcome = trial.await;
        if let Err(err) = self.js.delete_stream(&name).await {
            tracing::warn!(stream = %name, error = %err, "could not delete the trial stream");
        }
        match outcome {
            Ok((fast, atomic)) => {
                let mode = if fast > atomic * 2 { ATOMIC } else { FAST };
                tracing::info!(
                    fast_ms = fast.as_secs_f64() * 1e3,
                    atomic_ms = atomic.as_secs_f64() * 1e3,
                    "publishing batches {}",
                    if mode == FAST { "fast" } else { "atomic" }
                );
                mode
            }
            Err(err) => {
                tracing::warn!(error = %err, "batch trial failed; publishing batches atomic");
                ATOMIC
            }
        }
    }

    /// Publishes new tasks into their buckets and waits until JetStream has
    /// stored each; one result per task, in order. Several tasks go as fast
    /// or atomic batches ([`BatchPublish`]) where the stream takes them; a
    /// batch that fails fails all its tasks (even those stored, which the
    /// caller forgets). With `sync_interval: always` an atomic batch was
    /// measured 16 × faster than one acknowledged publish per task; with the
    /// default sync, fast batches stored 1.5-1.8 × as many messages per
    /// second as atomic ones in a raw test (BENCHMARKS.md items 10 and 45).
    pub async fn publish_tasks(&self, tasks: &[(i64, &NewTask)]) -> Vec<BusResult<()>> {
        // A batch's tasks share a few buckets: a subject is formatted once per
        // run of them, and its clones share the text.
        let mut last: Option<(i64, Subject)> = None;
        let with_headers = self.books_with_headers();
        let encoded: Vec<(Subject, HeaderMap, Bytes)> = tasks
            .iter()
            .map(|(bucket, task)| {
                let (headers, body) = encode_task(*bucket, task, with_headers);
                let subject = match &last {
                    Some((b, subject)) if b == bucket => subject.clone(),
                    _ => {
                        let subject = Subject::from(wire::bucket_subject(*bucket));
                        last = Some((*bucket, subject.clone()));
                        subject
                    }
                };
                (subject, headers, body)
            })
            .collect();
        let mode = self.batches.load(std::sync::atomic::Ordering::Relaxed);
        if tasks.len() < 2 || mode == ONE_BY_ONE {
            return self.publish_each(tasks, encoded).await;
        }
        let mut chunks: Vec<Vec<(Subject, HeaderMap, Bytes)>> = Vec::new();
        let mut bytes = 0;
        for message in encoded {
            let full = chunks.last().is_none_or(|c| {
                c.len() == ATOMIC_MAX_MESSAGES || bytes + message.2.len() > ATOMIC_MAX_BYTES
            });
            if full {
                chunks.push(Vec::new());
                bytes = 0;
            }
            bytes += message.2.len();
            chunks.last_mut().expect("pushed above").push(message);
        }
        let outcomes =
            futures::future::join_all(chunks.into_iter().map(|c| self.publish_batch(mode, c)))
                .await;
        outcomes
            .into_iter()
            .flat_map(|(len, outcome)| {
                (0..len).map(move |_| match &outcome {
                    Ok(()) => Ok(()),
                    Err(BusError::Unavailable(cause)) => Err(BusError::Unavailable(cause.clone())),
                })
            })
            .collect()
    }

    /// Publishes one message per task, each with its own acknowledgement.
    async fn publish_each(
        &self,
        tasks: &[(i64, &NewTask)],
        encoded: Vec<(Subject, HeaderMap, Bytes)>,
    ) -> Vec<BusResult<()>> {
        let Ok(_slot) = self.each_slots.acquire().await else {
            return tasks
                .iter()
                .map(|_| Err(BusError::Unavailable("shutting down".into())))
                .collect();
        };
        let mut pending = Vec::with_capacity(tasks.len());
        for ((_, task), (subject, headers, body)) in tasks.iter().zip(encoded) {
            let sent = self
                .js
                .send_publish(
                    subject,
                    jetstream::message::PublishMessage::build()
                        .payload(body)
                        .headers(headers)
                        .message_id(task.id.to_string()),
                )
                .await;
            pending.push(sent);
        }
        let mut results = Vec::with_capacity(tasks.len());
        for sent in pending {
            results.push(match sent {
                Ok(ack) => ack.await.map(drop).map_err(BusError::from_any),
                Err(err) => Err(BusError::from_any(err)),
            });
        }
        results
    }

    /// Publishes messages as one batch; returns how many it held and whether
    /// the batch was acknowledged whole.
    async fn publish_batch(
        &self,
        mode: u8,
        batch: Vec<(Subject, HeaderMap, Bytes)>,
    ) -> (usize, BusResult<()>) {
        let len = batch.len();
        let Ok(_slot) = self.batch_slots.acquire().await else {
            return (len, Err(BusError::Unavailable("shutting down".into())));
        };
        let outcome = if mode == FAST {
            fast::publish(&self.client, batch).await
        } else {
            self.publish_atomic(batch).await
        };
        (len, outcome)
    }

    /// Publishes messages as one atomic batch. On an error nothing was
    /// stored, except after a timeout, when the caller must treat the batch
    /// as in doubt.
    async fn publish_atomic(&self, batch: Vec<(Subject, HeaderMap, Bytes)>) -> BusResult<()> {
        let len = batch.len();
        let id = uuid::Uuid::now_v7().simple().to_string();
        let mut reply = None;
        for (seq, (subject, mut headers, body)) in batch.into_iter().enumerate() {
            let seq = seq + 1;
            headers.insert(BATCH_ID, id.as_str());
            headers.insert(BATCH_SEQUENCE, seq.to_string());
            if seq < len {
                if let Err(err) = self
                    .client
                    .publish_with_headers(subject, headers, body)
                    .await
                {
                    return Err(BusError::from_any(err));
                }
            } else {
                headers.insert(BATCH_COMMIT, "1");
                let request = async_nats::Request::new()
                    .payload(body)
                    .headers(headers)
                    .timeout(Some(Duration::from_secs(10)));
                reply = Some(self.client.send_request(subject, request).await);
            }
        }
        match reply {
            Some(Ok(message)) => match serde_json::from_slice::<BatchAck>(&message.payload) {
                Ok(BatchAck { error: Some(e), .. }) => Err(BusError::Unavailable(format!(
                    "atomic batch refused: {}",
                    e.description
                ))),
                Ok(BatchAck { count: Some(n), .. }) if n == len as u64 => Ok(()),
                Ok(ack) => Err(BusError::Unavailable(format!(
                    "atomic batch of {len} acknowledged as {:?}",
                    ack.count
                ))),
                Err(err) => Err(BusError::from_any(err)),
            },
            Some(Err(err)) => Err(BusError::from_any(err)),
            None => Ok(()),
        }
    }

    /// Makes a queue's durable consumers match its settings: global
    /// concurrency as `max_ack_pending`, the run timeout as `ack_wait`, the
    /// retry policy in its metadata (workers read it), and paused or not.
    /// Creates them when missing; running workers follow the change.
    ///
    /// A queue without a concurrency limit gets a second consumer for its
    /// ahead lane ([`wire::ahead_subject`]). A limited queue keeps one
    /// consumer, over both subjects, since its limit is that consumer's
    /// `max_ack_pending`; tasks already in the ahead lane drain through it.
    pub async fn apply_queue(&self, queue: &Queue) -> BusResult<()> {
        let stream = self
            .js
            .get_stream(wire::READY_STREAM)
            .await
            .map_err(BusError::from_any)?;
        let name = wire::queue_consumer(&queue.name);
        let ahead = wire::ahead_consumer(&queue.name);
        let s = &queue.settings;
        let metadata = HashMap::from([
            (
                wire::RETRY_INITIAL_MS_KEY.to_owned(),
                s.retry.initial_backoff_ms.to_string(),
            ),
            (
                wire::RETRY_MAX_MS_KEY.to_owned(),
                s.retry.max_backoff_ms.to_string(),
            ),
            (
                wire::RETRY_MULTIPLIER_KEY.to_owned(),
                s.retry.multiplier.to_string(),
            ),
            (
                wire::RETRY_JITTER_KEY.to_owned(),
                s.retry.jitter.to_string(),
            ),
        ]);
        let limited = s.max_concurrency > 0;
        let config = consumer::pull::Config {
            durable_name: Some(name.clone()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_millis(u64::try_from(s.run_timeout_ms).unwrap_or(30_000)),
            max_deliver: -1,
            max_ack_pending: if limited {
                i64::from(s.max_concurrency)
            } else {
                wire::UNLIMITED_ACK_PENDING
            },
            metadata,
            ..Default::default()
        };
        // Filters of a work-queue stream's consumers must not overlap: the
        // ahead consumer goes before the queue's widens, and after it narrows.
        if limited {
            if delete_consumer_if_present(&stream, &ahead).await? {
                // A consumer whose filter widens does not go back for
                // messages it already passed over (it skips what its
                // filter did not match), so what waits in the ahead lane
                // needs a queue consumer made anew. Its deliveries in
                // flight come again and their start claims skip them.
                delete_consumer_if_present(&stream, &name).await?;
            }
            stream
                .create_consumer(consumer::pull::Config {
                    filter_subjects: vec![
                        wire::ready_subject(&queue.name),
                        wire::ahead_subject(&queue.name),
                    ],
                    ..config
                })
                .await
                .map_err(BusError::from_any)?;
        } else {
            stream
                .create_consumer(consumer::pull::Config {
                    filter_subject: wire::ready_subject(&queue.name),
                    ..config.clone()
                })
                .await
                .map_err(BusError::from_any)?;
            stream
                .create_consumer(consumer::pull::Config {
                    durable_name: Some(ahead.clone()),
                    filter_subject: wire::ahead_subject(&queue.name),
                    metadata: HashMap::new(),
                    ..config
                })
                .await
                .map_err(BusError::from_any)?;
        }
        let consumers = if limited {
            vec![name]
        } else {
            vec![name, ahead]
        };
        for name in &consumers {
            if queue.paused {
                // JetStream pauses until an instant; far enough to mean "until resumed".
                let until = chrono::Utc::now() + chrono::Duration::days(365 * 100);
                stream
                    .pause_consumer(name, until)
                    .await
                    .map_err(BusError::from_any)?;
            } else {
                stream
                    .resume_consumer(name)
                    .await
                    .map_err(BusError::from_any)?;
            }
        }
        self.forget_lane(&queue.name);
        Ok(())
    }

    /// Returns the envelope a worker kept of a dead task, if still kept.
    pub async fn dead_letter(&self, task_id: TaskId) -> BusResult<Option<Bytes>> {
        let stream = self
            .js
            .get_stream(wire::DEAD_STREAM)
            .await
            .map_err(BusError::from_any)?;
        match stream
            .get_last_raw_message_by_subject(&wire::dead_subject(&task_id.to_string()))
            .await
        {
            Ok(message) => Ok(Some(message.payload)),
            Err(err)
                if err.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
            {
                Ok(None)
            }
            Err(err) => Err(BusError::from_any(err)),
        }
    }

    /// Rewrites a dead letter for a fresh set of attempts after the
    /// `attempts_before` already made: as many as the task had at first.
    /// Returns the envelope and the task's new total of attempts allowed.
    pub fn retry_envelope(dead_letter: &[u8], attempts_before: u32) -> BusResult<(Bytes, u32)> {
        let mut envelope = pb::TaskEnvelope::decode(dead_letter)
            .map_err(|e| BusError::Unavailable(format!("undecodable dead letter: {e}")))?;
        let fresh = envelope
            .max_attempts
            .saturating_sub(envelope.attempt_offset)
            .max(1);
        envelope.attempt_offset = attempts_before;
        envelope.max_attempts = attempts_before.saturating_add(fresh);
        let total = envelope.max_attempts;
        Ok((Bytes::from(envelope.encode_to_vec()), total))
    }

    /// Releases a dead task again with a fresh set of attempts, and waits
    /// until JetStream has stored it.
    pub async fn release_retry(
        &self,
        queue: &str,
        task_id: TaskId,
        bucket_ms: i64,
        envelope: Bytes,
        attempts_before: u32,
    ) -> BusResult<()> {
        let id = task_id.to_string();
        let msg_id = format!("{id}:retry:{attempts_before}");
        self.publish_ready(wire::ready_subject(queue), id, bucket_ms, envelope, msg_id)
            .await?
            .await
            .map_err(BusError::from_any)?;
        Ok(())
    }

    /// Publishes a task's envelope to one of its queue's subjects with the
    /// headers workers read; `msg_id` makes a repeat a no-op within the
    /// duplicate window. Returns the acknowledgement to wait for.
    async fn publish_ready(
        &self,
        subject: String,
        task_id: String,
        bucket_ms: i64,
        envelope: Bytes,
        msg_id: String,
    ) -> BusResult<jetstream::context::PublishAckFuture> {
        // An owned id is moved into its header; a `&str` would be copied.
        let mut headers = HeaderMap::new();
        headers.insert(TASK_ID, task_id);
        headers.insert(BUCKET, bucket_ms.to_string());
        self.js
            .send_publish(
                subject,
                jetstream::message::PublishMessage::build()
                    .payload(envelope)
                    .headers(headers)
                    .message_id(msg_id),
            )
            .await
            .map_err(BusError::from_any)
    }

    /// Tells every replica that new task events are committed.
    pub async fn signal_events(&self) {
        // Best effort: a lost signal costs a subscriber one poll interval.
        if let Err(err) = self
            .client
            .publish(wire::EVENTS_SUBJECT, Bytes::new())
            .await
        {
            tracing::debug!(error = %err, "event signal not sent");
        }
    }

    /// Subscribes to every replica's event signals.
    pub async fn event_signals(&self) -> BusResult<async_nats::Subscriber> {
        self.client
            .subscribe(wire::EVENTS_SUBJECT)
            .await
            .map_err(BusError::from_any)
    }

    /// Acknowledges a bucket message: the task has left the bucket for good.
    pub async fn ack(&self, reply: String) -> BusResult<()> {
        self.client
            .publish(Subject::from(reply), Bytes::new())
            .await
            .map_err(BusError::from_any)
    }

    /// Terminates a bucket message that is not a Kairos task.
    pub async fn term(&self, reply: &str) -> BusResult<()> {
        self.client
            .publish(Subject::from(reply), Bytes::from_static(b"+TERM"))
            .await
            .map_err(BusError::from_any)
    }

    /// Publishes a due task's envelope to its queue: to the queue's ahead
    /// lane when `ahead` (the caller saw [`Bus::ahead_lane`] say a worker
    /// pulls it), to the queue's own subject otherwise. The message id is the
    /// same on both, so JetStream drops a second release of the task.
    pub async fn release(
        &self,
        msg: &BucketMessage,
        body: Bytes,
        ahead: bool,
    ) -> BusResult<jetstream::context::PublishAckFuture> {
        let task_id = msg.task_id.to_string();
        let msg_id = wire::release_msg_id(&task_id);
        let subject = if ahead {
            wire::ahead_subject(&msg.queue)
        } else {
            wire::ready_subject(&msg.queue)
        };
        self.publish_ready(subject, task_id, msg.bucket_ms, body, msg_id)
            .await
    }

    /// Tells whether a worker pulls the queue's ahead lane now: its consumer
    /// exists, is not paused, and has a pull waiting or messages pending (or
    /// had within LANE_GRACE). A worker that does not know the lane never
    /// pulls it, so its tasks stay on the queue's own subject. Read once per
    /// queue, then again in the background (every two seconds, or every
    /// LANE_RECHECK while idle), so a slow JetStream API never holds up a
    /// release round.
    pub async fn ahead_lane(&self, queue: &str) -> AheadLane {
        let stale = match self.lanes().get_mut(queue) {
            Some(lane) if lane.reading || lane.fresh() => return lane.state(),
            Some(lane) => {
                lane.reading = true;
                Some(lane.state())
            }
            None => None,
        };
        match stale {
            Some(state) => {
                let (bus, queue) = (self.clone(), queue.to_owned());
                tokio::spawn(async move {
                    let seen = bus.read_ahead_lane(&queue).await;
                    bus.lanes()
                        .entry(queue)
                        .or_insert_with(Lane::unread)
                        .update(seen);
                });
                state
            }
            None => {
                let seen = self.read_ahead_lane(queue).await;
                let mut lanes = self.lanes();
                let lane = lanes.entry(queue.to_owned()).or_insert_with(Lane::unread);
                lane.update(seen);
                lane.state()
            }
        }
    }

    /// Reads from JetStream whether a worker pulls the queue's ahead lane.
    async fn read_ahead_lane(&self, queue: &str) -> AheadLane {
        let info = match self.js.get_stream(wire::READY_STREAM).await {
            Ok(stream) => stream
                .consumer_info(wire::ahead_consumer(queue))
                .await
                .map_err(BusError::from_any),
            Err(err) => Err(BusError::from_any(err)),
        };
        match info {
            Ok(info) if info.paused => AheadLane::Absent,
            Ok(info) if info.num_waiting > 0 || info.num_ack_pending > 0 => AheadLane::Pulled,
            Ok(_) => AheadLane::Idle,
            Err(err) => {
                tracing::debug!(queue, error = %err, "ahead lane not read; using the queue's subject");
                AheadLane::Absent
            }
        }
    }

    fn lanes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lane>> {
        self.lanes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Drops what this replica read of a queue's ahead lane (its consumers
    /// just changed).
    fn forget_lane(&self, queue: &str) {
        self.lanes().remove(queue);
    }

    /// Returns the buckets that hold at least one message.
    pub async fn buckets_with_messages(&self) -> BusResult<Vec<i64>> {
        let stream = self
            .js
            .get_stream(wire::TASKS_STREAM)
            .await
            .map_err(BusError::from_any)?;
        let subjects = stream
            .info_with_subjects(format!("{}.>", wire::TASKS_SUBJECT_PREFIX))
            .await
            .map_err(BusError::from_any)?;
        let found: Vec<(String, usize)> =
            subjects.try_collect().await.map_err(BusError::from_any)?;
        let prefix = format!("{}.", wire::TASKS_SUBJECT_PREFIX);
        Ok(found
            .into_iter()
            .filter_map(|(subject, _)| subject.strip_prefix(&prefix)?.parse().ok())
            .collect())
    }

    /// Recreates a bucket's consumer from scratch, so that messages a dead
    /// owner held unacknowledged are delivered again at once. A `headers_only`
    /// consumer delivers each message without its body.
    ///
    /// The consumer keeps its state in nats-server's memory. Every owner makes
    /// a fresh one anyway, so the state on disk was never read back, and with
    /// a million tasks held unacknowledged, writing it took a quarter of
    /// nats-server's CPU. After nats-server restarts the consumer is gone: the
    /// puller notices (`bucket_consumer_lost`) and the bucket is reopened.
    pub async fn reset_bucket_consumer(
        &self,
        bucket_ms: i64,
        ack_wait: Duration,
        headers_only: bool,
    ) -> BusResult<consumer::PullConsumer> {
        let stream = self
            .js
            .get_stream(wire::TASKS_STREAM)
            .await
            .map_err(BusError::from_any)?;
        let name = wire::bucket_consumer(bucket_ms);
        // A missing consumer is the normal case for a fresh bucket. Any other
        // failure fails the reset: creating over a consumer that survived
        // would only update it, and what it delivered to the previous puller
        // would wait for its ack_wait (25 minutes by default) instead of
        // coming back.
        match stream.delete_consumer(&name).await {
            Ok(_) => {}
            Err(err)
                if matches!(err.kind(), ConsumerErrorKind::JetStream(e)
                    if e.error_code() == ErrorCode::CONSUMER_NOT_FOUND) => {}
            Err(err) => return Err(BusError::from_any(err)),
        }
        let created = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(name),
                filter_subject: wire::bucket_subject(bucket_ms),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait,
                max_ack_pending: -1,
                deliver_policy: consumer::DeliverPolicy::All,
                headers_only,
                memory_storage: true,
                ..Default::default()
            })
            .await
            .map_err(BusError::from_any)?;
        // Another owner may have created it between the delete and the create.
        // (A fresh consumer's delivered stream sequence is the one before the
        // stream's first message, not 0; its consumer sequence is 0.)
        let info = created.cached_info();
        if info.delivered.consumer_sequence > 0 || info.num_ack_pending > 0 {
            return Err(BusError::Unavailable(format!(
                "bucket consumer {} was not fresh ({} unacknowledged)",
                info.name, info.num_ack_pending
            )));
        }
        Ok(created)
    }

    /// Tells whether a bucket pull error means that the bucket's consumer is
    /// gone (nats-server restarted, or someone deleted it), so that only a
    /// fresh consumer will deliver the bucket's messages again.
    pub async fn bucket_consumer_lost(&self, bucket_ms: i64, err: &MessagesError) -> bool {
        match err.kind() {
            MessagesErrorKind::ConsumerDeleted => true,
            MessagesErrorKind::MissingHeartbeat | MessagesErrorKind::NoResponders => {
                matches!(self.bucket_consumer_info(bucket_ms).await, Ok(None))
            }
            _ => false,
        }
    }

    /// Whether a bucket's consumer is gone once the client reconnected: a
    /// restarted server keeps no memory consumer. JetStream may answer
    /// nothing for a moment after a restart, so this asks for up to 2 s; if
    /// it cannot tell, the consumer's missed heartbeats tell later.
    pub async fn bucket_consumer_lost_on_reconnect(&self, bucket_ms: i64) -> bool {
        for _ in 0..10 {
            match self.bucket_consumer_info(bucket_ms).await {
                Ok(found) => return found.is_none(),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        false
    }

    /// Reads how far a bucket's consumer got; `None` when it does not exist.
    pub async fn bucket_progress(&self, bucket_ms: i64) -> BusResult<Option<BucketProgress>> {
        Ok(self
            .bucket_consumer_info(bucket_ms)
            .await?
            .map(|info| BucketProgress {
                undelivered: info.num_pending,
                unacknowledged: info.num_ack_pending as u64,
                delivered: info.delivered.stream_sequence,
                ack_floor: info.ack_floor.stream_sequence,
            }))
    }

    /// Reads a bucket consumer's info in one request; `None` when it does not exist.
    async fn bucket_consumer_info(&self, bucket_ms: i64) -> BusResult<Option<consumer::Info>> {
        let stream = self
            .js
            .get_stream(wire::TASKS_STREAM)
            .await
            .map_err(BusError::from_any)?;
        match stream.consumer_info(wire::bucket_consumer(bucket_ms)).await {
            Ok(info) => Ok(Some(info)),
            Err(err) if err.kind() == ConsumerInfoErrorKind::NotFound => Ok(None),
            Err(err) => Err(BusError::from_any(err)),
        }
    }

    /// Deletes a drained bucket's consumer.
    pub async fn delete_bucket_consumer(&self, bucket_ms: i64) -> BusResult<()> {
        let stream = self
            .js
            .get_stream(wire::TASKS_STREAM)
            .await
            .map_err(BusError::from_any)?;
        stream
            .delete_consumer(&wire::bucket_consumer(bucket_ms))
            .await
            .map_err(BusError::from_any)?;
        Ok(())
    }
}

// Header names built once: a name given as &str is validated and copied on
// every insert, which showed in ingest profiles.
const TASK_ID: HeaderName = HeaderName::from_static(wire::TASK_ID_HEADER);
const DUE: HeaderName = HeaderName::from_static(wire::DUE_HEADER);
const QUEUE: HeaderName = HeaderName::from_static(wire::QUEUE_HEADER);
const EXPIRE: HeaderName = HeaderName::from_static(wire::EXPIRE_HEADER);
const BUCKET: HeaderName = HeaderName::from_static(wire::BUCKET_HEADER);
const BATCH_ID: HeaderName = HeaderName::from_static("Nats-Batch-Id");
const BATCH_SEQUENCE: HeaderName = HeaderName::from_static("Nats-Batch-Sequence");
const BATCH_COMMIT: HeaderName = HeaderName::from_static("Nats-Batch-Commit");

/// Encodes a task as its envelope, plus (`with_headers`) the envelope's id,
/// due time, queue and expiry as headers. The dispatcher reads either; the
/// headers cost about a tenth of the server's CPU in a booking (BENCHMARKS.md
/// items 55 and 56).
fn encode_task(bucket_ms: i64, task: &NewTask, with_headers: bool) -> (HeaderMap, Bytes) {
    let expire_at_ms = task.expire_at.map_or(0, |t| t.timestamp_millis());
    let envelope = pb::TaskEnvelope {
        attempt_offset: 0,
        id: task.id.to_string(),
        queue: task.queue.clone(),
        payload: task.payload.clone(),
        content_type: task.content_type.clone(),
        headers: task.headers.clone().into_iter().collect(),
        due_at_ms: task.due_at.timestamp_millis(),
        expire_at_ms,
        max_attempts: task.max_attempts,
        bucket_ms,
        backoff: task.backoff.map(|b| pb::Backoff {
            initial: b.initial_ms.map(ms_to_proto),
            max: b.max_ms.map(ms_to_proto),
            multiplier: b.multiplier,
            jitter: b.jitter,
        }),
    };
    let mut headers = HeaderMap::new();
    if !with_headers {
        return (headers, Bytes::from(envelope.encode_to_vec()));
    }
    headers.insert(TASK_ID, envelope.id.as_str());
    headers.insert(DUE, envelope.due_at_ms.to_string());
    headers.insert(QUEUE, task.queue.as_str());
    if expire_at_ms > 0 {
        headers.insert(EXPIRE, expire_at_ms.to_string());
    }
    (headers, Bytes::from(envelope.encode_to_vec()))
}

fn ms_to_proto(ms: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// Deletes a consumer of `stream` if it exists; says whether it did.
async fn delete_consumer_if_present(
    stream: &jetstream::stream::Stream,
    name: &str,
) -> BusResult<bool> {
    match stream.consumer_info(name).await {
        Ok(_) => {
            stream
                .delete_consumer(name)
                .await
                .map_err(BusError::from_any)?;
            Ok(true)
        }
        Err(err) if err.kind() == ConsumerInfoErrorKind::NotFound => Ok(false),
        Err(err) => Err(BusError::from_any(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lane_seen_pulled_a_moment_ago_counts_as_pulled_between_two_pulls() {
        let mut lane = Lane::unread();
        lane.update(AheadLane::Idle);
        assert_eq!(lane.state(), AheadLane::Idle, "never seen pulled");
        lane.update(AheadLane::Pulled);
        lane.update(AheadLane::Idle);
        assert_eq!(lane.state(), AheadLane::Pulled, "between two pulls");
        lane.pulled_at = std::time::Instant::now().checked_sub(LANE_GRACE);
        assert_eq!(
            lane.state(),
            AheadLane::Idle,
            "nobody pulled for LANE_GRACE"
        );
        lane.update(AheadLane::Absent);
        lane.pulled_at = Some(std::time::Instant::now());
        assert_eq!(lane.state(), AheadLane::Absent, "its consumer went");
    }

    #[test]
    fn an_idle_lane_is_read_again_sooner() {
        let mut lane = Lane::unread();
        lane.update(AheadLane::Idle);
        lane.read_at = std::time::Instant::now()
            .checked_sub(LANE_RECHECK)
            .expect("uptime");
        assert!(!lane.fresh());
        lane.update(AheadLane::Pulled);
        lane.read_at = std::time::Instant::now()
            .checked_sub(LANE_RECHECK)
            .expect("uptime");
        assert!(lane.fresh());
    }
}

//! The Kairos side of each scenario, measured against the raw baselines.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::TryStreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use kairos_client::{Client, NewTask};
use kairos_worker::{HandlerError, Worker, handler_fn};
use tokio_util::sync::CancellationToken;

use crate::server::ServerProcess;

/// Tasks per ScheduleBatch call.
pub(crate) const BATCH: usize = 1000;
/// ScheduleBatch calls in flight at once.
pub(crate) const BATCH_STREAMS: usize = 4;

fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
            .expect("template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

/// Books `n` tasks with ScheduleBatch, `BATCH_STREAMS` calls at once; returns tasks/s.
pub(crate) async fn ingest_batches(
    client: &Client,
    queue: &str,
    n: usize,
    payload: Bytes,
    due: impl Fn(usize) -> DateTime<Utc>,
) -> anyhow::Result<(f64, Vec<String>)> {
    let progress = bar(n as u64, "booking");
    let started = Instant::now();
    let mut ids = Vec::with_capacity(n);
    let batches: Vec<Vec<NewTask>> = (0..n)
        .map(|i| NewTask::new(queue).payload(payload.clone()).at(due(i)))
        .collect::<Vec<_>>()
        .chunks(BATCH)
        .map(<[NewTask]>::to_vec)
        .collect();
    let mut in_flight = futures::stream::iter(batches.into_iter().map(|batch| {
        let mut client = client.clone();
        async move { client.schedule_batch(batch).await }
    }))
    .buffered(BATCH_STREAMS);
    use futures::StreamExt as _;
    while let Some(results) = in_flight.next().await {
        for result in results? {
            ids.push(result?.id);
        }
        progress.set_position(ids.len() as u64);
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    progress.finish_and_clear();
    Ok((rate, ids))
}

/// How a paced booking went.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Paced {
    /// Tasks booked per second, over the whole run.
    pub(crate) rate: f64,
    /// Batches whose ScheduleBatch answer came after their first task's due time.
    pub(crate) late_batches: usize,
    /// Worst margin between a batch's answer and its first due time, ms (negative: late).
    pub(crate) min_margin_ms: f64,
}

/// Books tasks due at `rate` per second from `start` for `n` tasks, each
/// batch of `BATCH` booked `lead` before its first task is due, as a producer
/// working just ahead of time would; up to `BATCH_STREAMS` calls in flight.
pub(crate) async fn book_paced(
    client: &Client,
    queue: &str,
    n: usize,
    payload: Bytes,
    rate: f64,
    start: DateTime<Utc>,
    lead: Duration,
) -> anyhow::Result<Paced> {
    use futures::StreamExt as _;
    let progress = bar(n as u64, "booking");
    let due =
        move |i: usize| start + chrono::Duration::microseconds((i as f64 / rate * 1e6) as i64);
    let lead = chrono::Duration::from_std(lead)?;
    let began = Instant::now();
    let mut calls = futures::stream::iter((0..n).step_by(BATCH).map(|first| {
        let mut client = client.clone();
        let batch: Vec<NewTask> = (first..(first + BATCH).min(n))
            .map(|i| NewTask::new(queue).payload(payload.clone()).at(due(i)))
            .collect();
        let first_due = due(first);
        async move {
            let wait = (first_due - lead - Utc::now()).to_std().unwrap_or_default();
            tokio::time::sleep(wait).await;
            let len = batch.len();
            for result in client.schedule_batch(batch).await? {
                result?;
            }
            let margin = (first_due - Utc::now()).num_microseconds().unwrap_or(0) as f64 / 1000.0;
            anyhow::Ok((len, margin))
        }
    }))
    .buffered(BATCH_STREAMS);
    let mut paced = Paced {
        rate: 0.0,
        late_batches: 0,
        min_margin_ms: f64::INFINITY,
    };
    while let Some(done) = calls.next().await {
        let (len, margin) = done?;
        progress.inc(len as u64);
        paced.late_batches += usize::from(margin < 0.0);
        paced.min_margin_ms = paced.min_margin_ms.min(margin);
    }
    progress.finish_and_clear();
    paced.rate = n as f64 / began.elapsed().as_secs_f64();
    Ok(paced)
}

/// Books `n` tasks with single Schedule calls, `concurrency` at once; returns tasks/s.
pub(crate) async fn ingest_singles(
    client: &Client,
    queue: &str,
    n: usize,
    payload: Bytes,
    concurrency: usize,
    due: DateTime<Utc>,
) -> anyhow::Result<f64> {
    use futures::StreamExt as _;
    let progress = bar(n as u64, "single");
    let started = Instant::now();
    let mut calls = futures::stream::iter((0..n).map(|_| {
        let mut client = client.clone();
        let task = NewTask::new(queue).payload(payload.clone()).at(due);
        async move { client.schedule(task).await }
    }))
    .buffer_unordered(concurrency);
    while let Some(result) = calls.next().await {
        result?;
        progress.inc(1);
    }
    progress.finish_and_clear();
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// One handler start: its task's due time and how late it started, in ms.
type Sample = (DateTime<Utc>, f64);

/// Lateness of the tasks due in one second of a run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Second {
    /// Seconds after the run's first due time.
    pub(crate) second: i64,
    pub(crate) tasks: usize,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
}

/// Lateness of each handler start, in ms after the task's due time.
#[derive(Debug, Clone, Default)]
pub(crate) struct Lateness {
    samples: Arc<Mutex<Vec<Sample>>>,
    ran: Arc<AtomicUsize>,
    ran_ids: Arc<Mutex<Vec<String>>>,
}

impl Lateness {
    /// Number of handler starts so far.
    pub(crate) fn count(&self) -> usize {
        self.ran.load(Ordering::Relaxed)
    }

    /// Returns the samples, sorted.
    pub(crate) fn sorted(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self
            .samples
            .lock()
            .expect("samples")
            .iter()
            .map(|&(_, late)| late)
            .collect();
        v.sort_by(f64::total_cmp);
        v
    }

    /// Returns the lateness of each second of due time from `start`, so a
    /// tail can be placed in the run.
    pub(crate) fn by_second(&self, start: DateTime<Utc>) -> Vec<Second> {
        let mut seconds: std::collections::BTreeMap<i64, Vec<f64>> = Default::default();
        for &(due, late) in self.samples.lock().expect("samples").iter() {
            let second = (due - start).num_milliseconds().div_euclid(1000);
            seconds.entry(second).or_default().push(late);
        }
        seconds
            .into_iter()
            .map(|(second, mut v)| {
                v.sort_by(f64::total_cmp);
                Second {
                    second,
                    tasks: v.len(),
                    p50_ms: quantile(&v, 0.5),
                    p99_ms: quantile(&v, 0.99),
                    max_ms: *v.last().expect("non-empty"),
                }
            })
            .collect()
    }

    /// Returns the ids of every task that ran.
    pub(crate) fn ran_ids(&self) -> Vec<String> {
        self.ran_ids.lock().expect("ids").clone()
    }
}

/// Starts `workers` no-op workers (each with its run slots and hold) that
/// record lateness; returns their stop token.
pub(crate) fn start_workers(
    server: &ServerProcess,
    nats_url: &str,
    queue: &str,
    workers: usize,
    (concurrency, hold): (usize, usize),
    lateness: &Lateness,
) -> anyhow::Result<CancellationToken> {
    let token = CancellationToken::new();
    for i in 0..workers {
        let lateness = lateness.clone();
        let handler = handler_fn(move |task| {
            let lateness = lateness.clone();
            async move {
                let due = task.due_at();
                let late = (Utc::now() - due).num_microseconds().unwrap_or(0) as f64 / 1000.0;
                lateness.samples.lock().expect("samples").push((due, late));
                lateness
                    .ran_ids
                    .lock()
                    .expect("ids")
                    .push(task.id().to_owned());
                lateness.ran.fetch_add(1, Ordering::Relaxed);
                Ok::<(), HandlerError>(())
            }
        });
        let worker = Worker::builder()
            .server(server.url.clone())
            .nats(nats_url)
            .queue(queue, handler)
            .concurrency(concurrency)
            .hold(hold)
            .worker_id(format!("bench-{i}"))
            .build()?;
        let token = token.clone();
        tokio::spawn(async move {
            if let Err(err) = worker.run(token).await {
                eprintln!("worker failed: {err}");
            }
        });
    }
    Ok(token)
}

/// Waits until `lateness` has `n` samples (with a progress bar) or `timeout` passes.
pub(crate) async fn wait_runs(lateness: &Lateness, n: usize, timeout: Duration) -> bool {
    let progress = bar(n as u64, "running");
    let deadline = Instant::now() + timeout;
    while lateness.count() < n && Instant::now() < deadline {
        progress.set_position(lateness.count() as u64);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    progress.finish_and_clear();
    lateness.count() >= n
}

/// Returns how many task messages the dispatchers hold unacknowledged.
pub(crate) async fn held(js: &async_nats::jetstream::Context) -> anyhow::Result<u64> {
    let stream = js.get_stream(kairos_proto::wire::TASKS_STREAM).await?;
    let consumers: Vec<_> = stream.consumers().try_collect().await?;
    Ok(consumers.iter().map(|c| c.num_ack_pending as u64).sum())
}

/// Returns (messages, last sequence) of a stream.
pub(crate) async fn stream_state(
    js: &async_nats::jetstream::Context,
    name: &str,
) -> anyhow::Result<(u64, u64)> {
    let mut stream = js.get_stream(name).await?;
    let info = stream.info().await?;
    Ok((info.state.messages, info.state.last_sequence))
}

/// Returns the value at quantile `q` of sorted samples.
pub(crate) fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

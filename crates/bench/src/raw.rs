//! Raw JetStream baselines on the same server: what Kairos's throughput is
//! measured against.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;

/// Acknowledgements kept in flight by the raw publisher (as the reference figures).
const IN_FLIGHT: usize = 1024;

async fn fresh_stream(
    js: &jetstream::Context,
    name: &str,
    subject: &str,
    retention: stream::RetentionPolicy,
) -> anyhow::Result<stream::Stream> {
    let _ = js.delete_stream(name).await;
    Ok(js
        .create_stream(stream::Config {
            name: name.into(),
            subjects: vec![subject.into()],
            retention,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?)
}

/// Times `publish` of `n` messages into a fresh stream on `subject`; returns msgs/s.
async fn timed_publish<F, Fut>(
    js: &jetstream::Context,
    stream: &str,
    subject: &'static str,
    n: usize,
    publish: F,
) -> anyhow::Result<f64>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    fresh_stream(js, stream, subject, stream::RetentionPolicy::Limits).await?;
    let started = Instant::now();
    publish().await?;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    js.delete_stream(stream).await?;
    Ok(rate)
}

/// Publishes `n` messages with acknowledgements, `IN_FLIGHT` at a time; returns msgs/s.
pub(crate) async fn publish_rate(
    js: &jetstream::Context,
    n: usize,
    payload: Bytes,
) -> anyhow::Result<f64> {
    timed_publish(js, "BENCH_RAW", "bench.raw", n, || {
        publish_n(js, "bench.raw", n, payload)
    })
    .await
}

/// Publishes `n` messages one at a time, each waiting for its acknowledgement
/// (with `sync_interval: always`, one fsync per message); returns msgs/s.
pub(crate) async fn publish_sequential_rate(
    js: &jetstream::Context,
    n: usize,
    payload: Bytes,
) -> anyhow::Result<f64> {
    timed_publish(js, "BENCH_SEQ", "bench.seq", n, || async {
        for _ in 0..n {
            js.publish("bench.seq", payload.clone()).await?.await?;
        }
        Ok(())
    })
    .await
}

/// Publishes `n` messages as JetStream atomic batches of `batch` messages
/// (nats-server 2.12+, `allow_atomic`), `in_flight` batches at once; returns
/// msgs/s, or `None` when the server refuses atomic batches.
pub(crate) async fn publish_atomic_rate(
    js: &jetstream::Context,
    n: usize,
    payload: Bytes,
    batch: usize,
    in_flight: usize,
) -> anyhow::Result<Option<f64>> {
    let _ = js.delete_stream("BENCH_ATOMIC").await;
    let created = js
        .create_stream(stream::Config {
            name: "BENCH_ATOMIC".into(),
            subjects: vec!["bench.atomic".into()],
            storage: stream::StorageType::File,
            allow_atomic_publish: true,
            ..Default::default()
        })
        .await;
    if created.is_err() {
        return Ok(None);
    }
    let client = js.client();
    let started = Instant::now();
    let batches: Vec<usize> = (0..n)
        .step_by(batch)
        .map(|first| batch.min(n - first))
        .collect();
    let mut commits = futures::stream::iter(batches.into_iter().enumerate().map(|(b, len)| {
        let client = client.clone();
        let payload = payload.clone();
        async move {
            let id = format!("bench-{b}");
            for seq in 1..=len {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Batch-Id", id.as_str());
                headers.insert("Nats-Batch-Sequence", seq.to_string().as_str());
                if seq == len {
                    headers.insert("Nats-Batch-Commit", "1");
                }
                // The first message and the commit wait for the server: the
                // first so a refused batch fails fast, the commit for the ack.
                if seq == 1 || seq == len {
                    let reply = client
                        .request_with_headers("bench.atomic", headers, payload.clone())
                        .await?;
                    let text = String::from_utf8_lossy(&reply.payload);
                    anyhow::ensure!(!text.contains("\"error\""), "atomic batch refused: {text}");
                } else {
                    client
                        .publish_with_headers("bench.atomic", headers, payload.clone())
                        .await?;
                }
            }
            anyhow::Ok(())
        }
    }))
    .buffer_unordered(in_flight);
    while let Some(done) = commits.next().await {
        done?;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let mut stream = js.get_stream("BENCH_ATOMIC").await?;
    let stored = stream.info().await?.state.messages;
    js.delete_stream("BENCH_ATOMIC").await?;
    anyhow::ensure!(stored == n as u64, "atomic batches stored {stored} of {n}");
    Ok(Some(rate))
}

async fn publish_n(
    js: &jetstream::Context,
    subject: &'static str,
    n: usize,
    payload: Bytes,
) -> anyhow::Result<()> {
    let mut pending = VecDeque::with_capacity(IN_FLIGHT);
    for _ in 0..n {
        if pending.len() == IN_FLIGHT {
            let ack: jetstream::context::PublishAckFuture = pending.pop_front().expect("non-empty");
            ack.await?;
        }
        pending.push_back(js.publish(subject, payload.clone()).await?);
    }
    for ack in pending {
        ack.await?;
    }
    Ok(())
}

/// The minimal relay pipeline Kairos's release path is: consume from a
/// stream, publish each message to a work-queue stream and wait for that
/// acknowledgement, acknowledge the source; a consumer acknowledges the
/// work-queue messages. Returns msgs/s from start to the last consumer ack,
/// and each message's arrival at the consumer in ms after the start (sorted),
/// the baseline's "lateness" when all messages fall due at the start.
pub(crate) async fn relay_rate(
    js: &jetstream::Context,
    n: usize,
    payload: Bytes,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let src = fresh_stream(
        js,
        "BENCH_SRC",
        "bench.src",
        stream::RetentionPolicy::WorkQueue,
    )
    .await?;
    let dst = fresh_stream(
        js,
        "BENCH_DST",
        "bench.dst",
        stream::RetentionPolicy::WorkQueue,
    )
    .await?;
    publish_n(js, "bench.src", n, payload).await?;
    let pull = |name: &str| consumer::pull::Config {
        durable_name: Some(name.into()),
        ack_policy: consumer::AckPolicy::Explicit,
        max_ack_pending: -1,
        ack_wait: Duration::from_secs(120),
        ..Default::default()
    };
    let relay_consumer = src.create_consumer(pull("relay")).await?;
    let sink_consumer = dst.create_consumer(pull("sink")).await?;

    let started = Instant::now();
    let relay_js = js.clone();
    let relay = tokio::spawn(async move {
        let mut messages = relay_consumer
            .stream()
            .max_messages_per_batch(1000)
            .messages()
            .await?;
        let mut pending = VecDeque::new();
        let mut relayed = 0;
        while relayed < n {
            let Some(msg) = messages.next().await else {
                break;
            };
            let msg = msg.map_err(|e| anyhow::anyhow!("{e}"))?;
            let ack = relay_js.publish("bench.dst", msg.payload.clone()).await?;
            pending.push_back((ack, msg));
            relayed += 1;
            if pending.len() >= IN_FLIGHT || relayed == n {
                for (ack, msg) in pending.drain(..) {
                    ack.await?;
                    msg.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                }
            }
        }
        anyhow::Ok(())
    });
    let mut sink = sink_consumer
        .stream()
        .max_messages_per_batch(1000)
        .messages()
        .await?;
    let mut arrivals = Vec::with_capacity(n);
    while arrivals.len() < n {
        let msg = sink
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("sink ended"))?;
        arrivals.push(started.elapsed().as_secs_f64() * 1000.0);
        msg.map_err(|e| anyhow::anyhow!("{e}"))?
            .ack()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    relay.await??;
    js.delete_stream("BENCH_SRC").await?;
    js.delete_stream("BENCH_DST").await?;
    Ok((rate, arrivals))
}

/// The naive "cycling" design Kairos avoids, as a comparison only: a consumer
/// re-publishes every not-yet-due message to the back of the stream. Runs for
/// `window` with `n` messages due in an hour; returns messages re-published.
pub(crate) async fn naive_cycling(
    js: &jetstream::Context,
    n: usize,
    payload: Bytes,
    window: Duration,
) -> anyhow::Result<u64> {
    let stream = fresh_stream(
        js,
        "BENCH_NAIVE",
        "bench.naive",
        stream::RetentionPolicy::WorkQueue,
    )
    .await?;
    publish_n(js, "bench.naive", n, payload).await?;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("naive".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: -1,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(1000)
        .messages()
        .await?;
    let deadline = tokio::time::Instant::now() + window;
    let mut republished = 0u64;
    let mut pending = VecDeque::new();
    loop {
        let next = tokio::select! {
            () = tokio::time::sleep_until(deadline) => break,
            next = messages.next() => next,
        };
        let Some(Ok(msg)) = next else { break };
        // Not due yet (everything is due in an hour): put it back at the end.
        pending.push_back((js.publish("bench.naive", msg.payload.clone()).await?, msg));
        republished += 1;
        if pending.len() >= IN_FLIGHT {
            for (ack, msg) in pending.drain(..) {
                ack.await?;
                let _ = msg.ack().await;
            }
        }
    }
    for (ack, msg) in pending.drain(..) {
        let _ = ack.await;
        let _ = msg.ack().await;
    }
    js.delete_stream("BENCH_NAIVE").await?;
    Ok(republished)
}

/// NATS's own scheduler (`Nats-Schedule: @at`, nats-server 2.12+), as the
/// comparison the burst scenario asks for: `n` one-shot schedules due at
/// `due`, each on its own subject (a subject holds one schedule), all
/// targeting one subject a consumer reads. Returns each delivery's lateness in
/// ms after `due` (sorted), or `None` when the server has no message schedules.
pub(crate) async fn nats_schedule_lateness(
    js: &jetstream::Context,
    n: usize,
    payload: Bytes,
    lead: Duration,
) -> anyhow::Result<Option<Vec<f64>>> {
    let _ = js.delete_stream("BENCH_SCHED").await;
    let created = js
        .create_stream(stream::Config {
            name: "BENCH_SCHED".into(),
            subjects: vec!["bench.sched.*".into(), "bench.fired".into()],
            storage: stream::StorageType::File,
            allow_message_schedules: true,
            ..Default::default()
        })
        .await;
    let Ok(stream) = created else {
        return Ok(None);
    };
    // Whole seconds, so the `@at` time is exact whatever precision it takes.
    let due = chrono::Utc::now() + chrono::Duration::from_std(lead)?;
    let due = chrono::DateTime::from_timestamp(due.timestamp() + 1, 0).expect("valid time");
    let spec = format!(
        "@at {}",
        due.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    let mut pending = VecDeque::with_capacity(IN_FLIGHT);
    for i in 0..n {
        if pending.len() == IN_FLIGHT {
            let ack: jetstream::context::PublishAckFuture = pending.pop_front().expect("non-empty");
            ack.await?;
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Schedule", spec.as_str());
        headers.insert("Nats-Schedule-Target", "bench.fired");
        pending.push_back(
            js.publish_with_headers(format!("bench.sched.{i}"), headers, payload.clone())
                .await?,
        );
    }
    for ack in pending {
        ack.await?;
    }
    anyhow::ensure!(
        chrono::Utc::now() < due,
        "booking the NATS schedules took longer than the lead"
    );
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("fired".into()),
            filter_subject: "bench.fired".into(),
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(1000)
        .messages()
        .await?;
    let mut lateness = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + lead + Duration::from_secs(300);
    while lateness.len() < n {
        let next = tokio::select! {
            () = tokio::time::sleep_until(deadline) => break,
            next = messages.next() => next,
        };
        let Some(msg) = next else { break };
        msg.map_err(|e| anyhow::anyhow!("{e}"))?;
        let late = (chrono::Utc::now() - due).num_microseconds().unwrap_or(0) as f64 / 1000.0;
        lateness.push(late);
    }
    js.delete_stream("BENCH_SCHED").await?;
    anyhow::ensure!(
        lateness.len() == n,
        "NATS delivered {} of {n} schedules",
        lateness.len()
    );
    lateness.sort_by(f64::total_cmp);
    Ok(Some(lateness))
}

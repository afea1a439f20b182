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

/// Publishes `n` messages with acknowledgements, `IN_FLIGHT` at a time; returns msgs/s.
pub(crate) async fn publish_rate(
    js: &jetstream::Context,
    n: usize,
    payload: Bytes,
) -> anyhow::Result<f64> {
    fresh_stream(
        js,
        "BENCH_RAW",
        "bench.raw",
        stream::RetentionPolicy::Limits,
    )
    .await?;
    let started = Instant::now();
    publish_n(js, "bench.raw", n, payload).await?;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    js.delete_stream("BENCH_RAW").await?;
    Ok(rate)
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

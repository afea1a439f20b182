//! kairos-server: the gRPC front (SchedulerService, StatusService, health,
//! reflection), the dispatcher and the status recorder of one replica.
//! Replicas are interchangeable; each keeps only timers in memory.
//!
//! # Layout
//! - [`config`]: `ServerConfig`, every setting a flag and a `KAIROS_*` variable.
//! - [`api`]: the tonic edge; converts, validates and calls [`app`].
//! - [`app`]: use cases (schedule, cancel, look up, record reports).
//! - [`domain`]: pure types and rules (task ids, states, validation, buckets).
//! - [`store`]: SQL (SQLite or Postgres) and the Redis claims.
//! - [`bus`]: JetStream streams, publishing and bucket consumers.
//! - [`engine`]: background loops (the dispatcher).

pub mod api;
pub mod app;
pub mod bus;
pub mod config;
pub mod domain;
pub mod engine;
pub mod shutdown;
pub mod store;
pub mod telemetry;

use anyhow::Context as _;
use kairos_proto::v1::queue_service_server::QueueServiceServer;
use kairos_proto::v1::scheduler_service_server::SchedulerServiceServer;
use kairos_proto::v1::status_service_server::StatusServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tonic::codec::CompressionEncoding;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tracing::info;

pub use config::ServerConfig;

use crate::api::{QueueApi, SchedulerApi, StatusApi};
use crate::app::{
    EventService, QueueService, Recorder, RecurringService, ReportService, TaskService,
};
use crate::bus::{Bus, StreamSettings};
use crate::engine::dispatcher::Dispatcher;
use crate::engine::materializer::Materializer;
use crate::store::claims::Claims;

/// Runs one replica on an already-bound listener until `shutdown` fires, then
/// stops taking requests, finishes in-flight ones and flushes the recorder.
pub async fn run(
    config: ServerConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.validate().context("invalid configuration")?;
    let replica_id = if config.replica_id.is_empty() {
        format!("replica-{}", uuid::Uuid::now_v7().simple())
    } else {
        config.replica_id.clone()
    };
    let width_ms = config.bucket_width.as_millis() as i64;

    let store = store::connect(&config.database_url)
        .await
        .context("failed to open the database")?;
    let claims = Claims::connect(&config.redis_url, config.claim_retention)
        .context("failed to configure redis")?;
    let bus = Bus::connect(&config.nats_url, &replica_id)
        .await
        .context("failed to connect to nats")?;
    bus.ensure_streams(&StreamSettings {
        replicas: config.stream_replicas,
        duplicate_window: config.duplicate_window,
        dead_retention: config.dead_retention,
        batch_publish: config.batch_publish,
        booking_headers: config.booking_headers,
    })
    .await
    .context("failed to create the jetstream streams")?;

    // Background work stops on `work`, which fires only after the gRPC server
    // has drained, so in-flight RPCs can still record their results.
    let work = CancellationToken::new();
    let (recorder, recorder_handle) = Recorder::spawn(store.clone(), bus.clone(), work.clone());
    let queues = QueueService::new(
        store.clone(),
        bus.clone(),
        config.queue_defaults(),
        config.max_attempts_limit,
    );
    // Consumers lost, or created by a worker before the queue was, get their settings back.
    queues.reconcile().await;
    let tasks = TaskService::new(
        store.clone(),
        claims.clone(),
        bus.clone(),
        recorder.clone(),
        queues.clone(),
        config.limits(),
        width_ms,
    );
    let reports = ReportService::new(
        store.clone(),
        claims.clone(),
        recorder.clone(),
        queues.clone(),
        width_ms,
    );
    let recurring = RecurringService::new(
        store.clone(),
        tasks.clone(),
        config.limits(),
        config.min_recurrence_interval,
    );
    // Subscribe streams end on `shutdown`, before the server drains, or the
    // drain would wait for them.
    let events = EventService::new(store.clone(), config.events(), shutdown.clone());
    let events_handle =
        AbortOnDropHandle::new(tokio::spawn(events.clone().run(bus.clone(), work.clone())));
    let materializer = Materializer::new(store.clone(), tasks.clone(), config.materialize());
    let materializer_handle = AbortOnDropHandle::new(tokio::spawn(materializer.run(work.clone())));
    let dispatcher = Dispatcher::new(
        bus.clone(),
        claims.clone(),
        store.clone(),
        recorder.clone(),
        config.dispatch(replica_id.clone()),
    );
    // Aborted if `run` itself is dropped (a killed replica), so the dispatcher stops too.
    let mut dispatcher_handle = AbortOnDropHandle::new(tokio::spawn(dispatcher.run(work.clone())));

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<SchedulerServiceServer<SchedulerApi>>()
        .await;
    health.set_serving::<StatusServiceServer<StatusApi>>().await;
    health.set_serving::<QueueServiceServer<QueueApi>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(kairos_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("failed to build reflection v1")?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(kairos_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("failed to build reflection v1alpha")?;

    let scheduler = SchedulerServiceServer::new(SchedulerApi::new(tasks, recurring, events))
        .max_decoding_message_size(config.max_message_bytes)
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip);
    let queue_api = QueueServiceServer::new(QueueApi::new(queues));
    let status = StatusServiceServer::new(StatusApi::new(reports, shutdown.clone()))
        .max_decoding_message_size(config.max_message_bytes);

    let addr = listener.local_addr().context("listener has no address")?;
    info!(%addr, replica_id, "kairos-server listening");
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let health_on_shutdown = health.clone();
    let stop = shutdown.clone();
    let served = Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(scheduler)
        .add_service(queue_api)
        .add_service(status)
        .serve_with_incoming_shutdown(incoming, async move {
            stop.cancelled().await;
            health_on_shutdown
                .set_not_serving::<SchedulerServiceServer<SchedulerApi>>()
                .await;
        });
    let result = tokio::select! {
        result = served => result.context("grpc server failed"),
        _ = &mut dispatcher_handle => Err(anyhow::anyhow!("dispatcher stopped unexpectedly")),
    };
    info!("grpc server stopped; flushing");
    work.cancel();
    let drain = async {
        let _ = (&mut dispatcher_handle).await;
        let _ = materializer_handle.await;
        let _ = events_handle.await;
        drop(recorder);
        let _ = recorder_handle.await;
        let _ = bus.client().flush().await;
    };
    if tokio::time::timeout(config.shutdown_timeout, drain)
        .await
        .is_err()
    {
        tracing::warn!("shutdown timed out");
    }
    result
}

//! The `kairos-worker` binary: serves one queue with a built-in handler.

use std::time::Duration;

use clap::Parser;
use kairos_worker::{Handler, HandlerError, TaskContext, Worker};
use tokio_util::sync::CancellationToken;
use tracing::info;

// glibc malloc showed up at ~10 % of CPU in a burst profile (malloc, free,
// unlink_chunk, malloc_consolidate); mimalloc is faster for many small,
// short-lived allocations and fragments less.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Built-in handlers.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum HandlerKind {
    /// Logs each task (id, attempt, lateness and payload) and succeeds.
    Log,
}

/// Runs Kairos tasks of one queue with a built-in handler.
#[derive(Debug, Parser)]
#[command(name = "kairos-worker", version)]
struct WorkerConfig {
    /// kairos-server address.
    #[arg(long, env = "KAIROS_SERVER", default_value = "http://127.0.0.1:50051")]
    server: String,
    /// NATS server URL.
    #[arg(long, env = "KAIROS_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// Queue to serve.
    #[arg(long, env = "KAIROS_QUEUE", default_value = "default")]
    queue: String,
    /// Handler to run.
    #[arg(long, env = "KAIROS_HANDLER", value_enum, default_value = "log")]
    handler: HandlerKind,
    /// Tasks run at once by this process.
    #[arg(long, env = "KAIROS_CONCURRENCY", default_value_t = 8)]
    concurrency: usize,
    /// Worker identity in the run log (default: pid and a random suffix).
    #[arg(long, env = "KAIROS_WORKER_ID")]
    worker_id: Option<String>,
    /// Run timeout used when this worker creates the queue's consumer.
    #[arg(long, env = "KAIROS_ACK_WAIT", default_value = "30s", value_parser = humantime::parse_duration)]
    ack_wait: Duration,
}

/// Logs the task and succeeds: the demo handler.
struct LogHandler;

impl Handler for LogHandler {
    async fn handle(&self, task: TaskContext) -> Result<(), HandlerError> {
        let late_ms = (chrono::Utc::now() - task.due_at()).num_milliseconds();
        let payload = String::from_utf8_lossy(task.payload());
        let payload: String = payload.chars().take(200).collect();
        info!(
            task_id = task.id(),
            queue = task.queue(),
            attempt = task.attempt(),
            late_ms,
            payload,
            "task ran"
        );
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = WorkerConfig::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("KAIROS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        signal.cancel();
    });
    let mut builder = Worker::builder()
        .server(config.server)
        .nats(config.nats_url)
        .concurrency(config.concurrency)
        .ack_wait(config.ack_wait);
    if let Some(id) = config.worker_id {
        builder = builder.worker_id(id);
    }
    builder = match config.handler {
        HandlerKind::Log => builder.queue(config.queue, LogHandler),
    };
    builder.build()?.run(shutdown).await?;
    Ok(())
}

//! The `kairos-worker` binary: serves one queue with a built-in handler.

use std::time::Duration;

use clap::Parser;
use kairos_worker::{Handler, HandlerError, TaskContext, WebhookHandler, Worker};
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
    /// POSTs each task's payload, signed, to --webhook-url (or the task's
    /// `webhook-url` header): 2xx succeeds, 429/5xx/timeouts retry, other 4xx are dead.
    Webhook,
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
    /// Tasks released ahead of their due time held by this process until then.
    #[arg(long, env = "KAIROS_HOLD", default_value_t = 1_000)]
    hold: usize,
    /// Worker identity in the run log (default: pid and a random suffix).
    #[arg(long, env = "KAIROS_WORKER_ID")]
    worker_id: Option<String>,
    /// Run timeout used if this worker creates the queue's consumer before the server has.
    #[arg(long, env = "KAIROS_ACK_WAIT", default_value = "30s", value_parser = humantime::parse_duration)]
    ack_wait: Duration,
    /// Webhook handler: where tasks are POSTed (a task's `webhook-url` header overrides it).
    #[arg(long, env = "KAIROS_WEBHOOK_URL")]
    webhook_url: Option<String>,
    /// Webhook handler: shared secret of the HMAC-SHA256 `Kairos-Signature` header.
    #[arg(long, env = "KAIROS_WEBHOOK_SECRET", hide_env_values = true)]
    webhook_secret: Option<String>,
    /// Webhook handler: longest wait for a response; a timeout is retried.
    #[arg(long, env = "KAIROS_WEBHOOK_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    webhook_timeout: Duration,
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
async fn main() -> std::process::ExitCode {
    match run(WorkerConfig::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // One line, no backtrace: these are configuration mistakes.
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(config: WorkerConfig) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KAIROS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    kairos_worker::small_pages();
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
        .hold(config.hold)
        .ack_wait(config.ack_wait);
    if let Some(id) = config.worker_id {
        builder = builder.worker_id(id);
    }
    builder = match config.handler {
        HandlerKind::Log => builder.queue(config.queue, LogHandler),
        HandlerKind::Webhook => {
            let secret = config
                .webhook_secret
                .filter(|s| !s.is_empty())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "the webhook handler needs KAIROS_WEBHOOK_SECRET (--webhook-secret): \
                         receivers verify each request with it"
                    )
                })?;
            let handler = WebhookHandler::new(
                config.webhook_url.as_deref(),
                secret.as_bytes(),
                config.webhook_timeout,
            )?;
            builder.queue(config.queue, handler)
        }
    };
    builder.build()?.run(shutdown).await?;
    Ok(())
}

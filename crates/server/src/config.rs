//! Server configuration: every setting is a flag and a `KAIROS_*` variable.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

use crate::app::EventSettings;
use crate::domain::{Limits, QueueSettings, RetryPolicy};
use crate::engine::dispatcher::DispatchSettings;
use crate::engine::materializer::MaterializeSettings;

/// Configuration of `kairos-server`.
#[derive(Debug, Clone, Parser)]
#[command(name = "kairos-server", version, about = "Kairos scheduling server")]
pub struct ServerConfig {
    /// Address the gRPC server listens on.
    #[arg(long, env = "KAIROS_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// NATS server URL (JetStream must be enabled).
    #[arg(long, env = "KAIROS_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,

    /// Redis URL, for the atomic task claims and bucket leases.
    #[arg(
        long,
        env = "KAIROS_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,

    /// Database URL: `sqlite://PATH` (default) or `postgres://…` for several replicas.
    #[arg(
        long,
        env = "KAIROS_DATABASE_URL",
        default_value = "sqlite://.kairos/kairos.db"
    )]
    pub database_url: String,

    /// Width of a time bucket (one JetStream subject per bucket).
    #[arg(long, env = "KAIROS_BUCKET_WIDTH", default_value = "10m", value_parser = humantime::parse_duration)]
    pub bucket_width: Duration,

    /// How far ahead the dispatcher opens buckets and holds their tasks in memory.
    #[arg(long, env = "KAIROS_LOOKAHEAD", default_value = "10m", value_parser = humantime::parse_duration)]
    pub lookahead: Duration,

    /// How long before a bucket's window starts the dispatcher loads its tasks'
    /// bodies; tasks further out are held in memory without them.
    #[arg(long, env = "KAIROS_BODY_PREFETCH", default_value = "1m", value_parser = humantime::parse_duration)]
    pub body_prefetch: Duration,

    /// How long before its due time a task is released to its queue. The
    /// worker holds it and starts it at the due time, so a burst booked
    /// ahead is released before its instant and only the workers' part is
    /// left for the instant; 0 releases at the due time.
    #[arg(long, env = "KAIROS_RELEASE_LEAD", default_value = "2s", value_parser = humantime::parse_duration)]
    pub release_lead: Duration,

    /// How often the dispatcher compares each bucket's consumer with the tasks
    /// it holds of it; a shortfall that lasts two audits reloads the bucket.
    #[arg(long, env = "KAIROS_BUCKET_AUDIT_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub bucket_audit_interval: Duration,

    /// Furthest a task may be scheduled ahead.
    #[arg(long, env = "KAIROS_MAX_HORIZON", default_value = "400days", value_parser = humantime::parse_duration)]
    pub max_horizon: Duration,

    /// How far ahead the fire times of recurring schedules become tasks (at most KAIROS_LOOKAHEAD).
    #[arg(long, env = "KAIROS_RECURRING_AHEAD", default_value = "1m", value_parser = humantime::parse_duration)]
    pub recurring_ahead: Duration,

    /// How late a fire time may be and still run as usual; later ones follow the catch-up policy.
    #[arg(long, env = "KAIROS_CATCH_UP_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub catch_up_grace: Duration,

    /// Shortest gap allowed between two fire times of a recurring schedule.
    #[arg(long, env = "KAIROS_MIN_RECURRENCE_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub min_recurrence_interval: Duration,

    /// Largest task payload in bytes.
    #[arg(long, env = "KAIROS_MAX_PAYLOAD_BYTES", default_value_t = 1024 * 1024)]
    pub max_payload_bytes: usize,

    /// Attempts per task when the request does not say.
    #[arg(long, env = "KAIROS_DEFAULT_MAX_ATTEMPTS", default_value_t = 3)]
    pub default_max_attempts: u32,

    /// Most attempts a request may ask for.
    #[arg(long, env = "KAIROS_MAX_ATTEMPTS_LIMIT", default_value_t = 100)]
    pub max_attempts_limit: u32,

    /// Time-to-live of a bucket lease: how fast another replica takes over a dead one's buckets.
    #[arg(long, env = "KAIROS_LEASE_TTL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub lease_ttl: Duration,

    /// How long claim state in Redis outlives its bucket (covers retries).
    #[arg(long, env = "KAIROS_CLAIM_RETENTION", default_value = "7days", value_parser = humantime::parse_duration)]
    pub claim_retention: Duration,

    /// JetStream replicas of the Kairos streams (1 on a single NATS server).
    #[arg(long, env = "KAIROS_STREAM_REPLICAS", default_value_t = 1)]
    pub stream_replicas: usize,

    /// JetStream duplicate window for task and release message ids.
    #[arg(long, env = "KAIROS_DUPLICATE_WINDOW", default_value = "2m", value_parser = humantime::parse_duration)]
    pub duplicate_window: Duration,

    /// How several new tasks go to NATS at once: `fast` (fast-ingest
    /// batches, nats-server 2.14+), `atomic` (one sync per batch: for NATS
    /// with `sync_interval: always`, which syncs every message of a fast
    /// one), or `auto`: whichever a trial at startup finds quicker.
    #[arg(long, env = "KAIROS_BATCH_PUBLISH", value_enum, default_value = "auto")]
    pub batch_publish: crate::bus::BatchPublish,

    /// Whether a new task also carries its id, due time, queue and expiry as
    /// NATS headers. Replicas before this version read only those: keep it on
    /// while replacing such replicas one by one, and turn it off once none is
    /// left. Off, a booking costs less CPU (BENCHMARKS.md item 56).
    #[arg(long, env = "KAIROS_BOOKING_HEADERS", default_value_t = false, action = clap::ArgAction::Set)]
    pub booking_headers: bool,

    /// Identity of this replica (the bucket lease value); random when empty.
    #[arg(long, env = "KAIROS_REPLICA_ID", default_value = "")]
    pub replica_id: String,

    /// Largest gRPC message the server accepts, in bytes.
    #[arg(long, env = "KAIROS_MAX_MESSAGE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Global concurrency of a queue created on first use; 0 for no limit.
    #[arg(long, env = "KAIROS_QUEUE_MAX_CONCURRENCY", default_value_t = 0)]
    pub queue_max_concurrency: u32,

    /// Run timeout of a queue created on first use (redelivery after this long without a sign of life).
    #[arg(long, env = "KAIROS_QUEUE_RUN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub queue_run_timeout: Duration,

    /// First retry delay of a queue created on first use.
    #[arg(long, env = "KAIROS_QUEUE_INITIAL_BACKOFF", default_value = "1s", value_parser = humantime::parse_duration)]
    pub queue_initial_backoff: Duration,

    /// Longest retry delay of a queue created on first use.
    #[arg(long, env = "KAIROS_QUEUE_MAX_BACKOFF", default_value = "5m", value_parser = humantime::parse_duration)]
    pub queue_max_backoff: Duration,

    /// Growth of the retry delay per attempt, for a queue created on first use.
    #[arg(long, env = "KAIROS_QUEUE_BACKOFF_MULTIPLIER", default_value_t = 2.0)]
    pub queue_backoff_multiplier: f64,

    /// Random variation of each retry delay (fraction either way), for a queue created on first use.
    #[arg(long, env = "KAIROS_QUEUE_BACKOFF_JITTER", default_value_t = 0.2)]
    pub queue_backoff_jitter: f64,

    /// How long the envelope of a dead task is kept, so RetryTask can run it again.
    #[arg(long, env = "KAIROS_DEAD_RETENTION", default_value = "30days", value_parser = humantime::parse_duration)]
    pub dead_retention: Duration,

    /// Events one Subscribe stream may have waiting before it is cut off (ABORTED, resumable).
    #[arg(long, env = "KAIROS_SUBSCRIBE_BUFFER", default_value_t = 10_000)]
    pub subscribe_buffer: usize,

    /// How long task events are kept for Subscribe to replay.
    #[arg(long, env = "KAIROS_EVENT_RETENTION", default_value = "3days", value_parser = humantime::parse_duration)]
    pub event_retention: Duration,

    /// How long shutdown waits for in-flight RPCs.
    #[arg(long, env = "KAIROS_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,
}

/// A setting that makes no sense.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {setting}: {reason}")]
pub struct ConfigError {
    /// The setting.
    pub setting: &'static str,
    /// Why.
    pub reason: String,
}

impl ServerConfig {
    /// Checks the settings together, before anything starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |setting, reason: &str| {
            Err(ConfigError {
                setting,
                reason: reason.to_owned(),
            })
        };
        if self.bucket_width < Duration::from_secs(1) {
            return bad("KAIROS_BUCKET_WIDTH", "must be at least 1s");
        }
        if self.lease_ttl < Duration::from_secs(1) {
            return bad("KAIROS_LEASE_TTL", "must be at least 1s");
        }
        if self.default_max_attempts == 0 || self.default_max_attempts > self.max_attempts_limit {
            return bad(
                "KAIROS_DEFAULT_MAX_ATTEMPTS",
                "must be between 1 and KAIROS_MAX_ATTEMPTS_LIMIT",
            );
        }
        if let Err(err) = self.queue_defaults().validate(self.max_attempts_limit) {
            return Err(ConfigError {
                setting: "KAIROS_QUEUE_*",
                reason: err.to_string(),
            });
        }
        if self.release_lead > Duration::from_secs(5) {
            // What goes ahead waits in the workers' holds, which a longer
            // lead only fills; a burst's longer lead is the backlog's to
            // plan (see engine::backlog).
            return bad("KAIROS_RELEASE_LEAD", "must be at most 5s");
        }
        if self.subscribe_buffer == 0 {
            return bad("KAIROS_SUBSCRIBE_BUFFER", "must be positive");
        }
        if self.max_payload_bytes == 0 {
            return bad("KAIROS_MAX_PAYLOAD_BYTES", "must be positive");
        }
        Ok(())
    }

    /// Returns the settings of a queue created on first use.
    pub fn queue_defaults(&self) -> QueueSettings {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        QueueSettings {
            max_concurrency: self.queue_max_concurrency,
            retry: RetryPolicy {
                max_attempts: self.default_max_attempts,
                initial_backoff_ms: ms(self.queue_initial_backoff),
                max_backoff_ms: ms(self.queue_max_backoff),
                multiplier: self.queue_backoff_multiplier,
                jitter: self.queue_backoff_jitter,
            },
            run_timeout_ms: ms(self.queue_run_timeout),
            expire_after_ms: None,
            rate_per_s: 0.0,
            rate_burst: 1,
        }
    }

    /// Returns the event log and Subscribe settings.
    pub fn events(&self) -> EventSettings {
        EventSettings {
            buffer: self.subscribe_buffer,
            poll: Duration::from_secs(1),
            retention: self.event_retention,
        }
    }

    /// Returns the materializer settings.
    pub fn materialize(&self) -> MaterializeSettings {
        MaterializeSettings {
            ahead: self.recurring_ahead.min(self.lookahead),
            grace: self.catch_up_grace,
            tick: Duration::from_millis(500),
        }
    }

    /// Returns the request limits.
    pub fn limits(&self) -> Limits {
        Limits {
            max_payload_bytes: self.max_payload_bytes,
            max_horizon: self.max_horizon,
            default_max_attempts: self.default_max_attempts,
            max_attempts_limit: self.max_attempts_limit,
        }
    }

    /// Returns the dispatcher settings.
    pub fn dispatch(&self, replica_id: String) -> DispatchSettings {
        DispatchSettings {
            width: self.bucket_width,
            lookahead: self.lookahead,
            lease_ttl: self.lease_ttl,
            tick: Duration::from_millis(250),
            scan_every: Duration::from_secs(30),
            audit_every: self.bucket_audit_interval,
            grace: Duration::from_secs(30),
            body_prefetch: self.body_prefetch,
            release_lead: self.release_lead,
            replica_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_release_lead_beyond_five_seconds_is_refused_by_name() {
        let config = ServerConfig::parse_from(["kairos-server", "--release-lead", "6s"]);
        let err = config.validate().expect_err("refused");
        assert_eq!(err.setting, "KAIROS_RELEASE_LEAD");
        let config = ServerConfig::parse_from(["kairos-server", "--release-lead", "5s"]);
        assert!(config.validate().is_ok());
        let default = ServerConfig::parse_from(["kairos-server"]);
        assert_eq!(default.release_lead, Duration::from_secs(2));
    }
}

//! Queues: global concurrency, retry policy, run timeout and pause, checked
//! here and enforced by the queue's JetStream consumer and its workers.

use chrono::{DateTime, Utc};
use kairos_proto::wire;

use super::ValidationError;

/// How failed attempts of a queue's tasks are retried.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts for tasks booked without their own.
    pub max_attempts: u32,
    /// Delay before the second attempt, ms.
    pub initial_backoff_ms: i64,
    /// Longest delay, ms.
    pub max_backoff_ms: i64,
    /// Growth of the delay per attempt.
    pub multiplier: f64,
    /// Random variation of each delay, as a fraction either way.
    pub jitter: f64,
}

/// What a queue's owner chooses.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSettings {
    /// Most tasks running at once across every worker; 0 for no limit.
    pub max_concurrency: u32,
    /// Retries.
    pub retry: RetryPolicy,
    /// How long an attempt may go without a sign of life, ms.
    pub run_timeout_ms: i64,
    /// Start deadline after the due time for tasks booked without one, ms.
    pub expire_after_ms: Option<i64>,
    /// Most attempts started per second, across workers; 0 for no limit.
    pub rate_per_s: f64,
    /// Starts allowed at once after a quiet spell.
    pub rate_burst: u32,
}

/// A stored queue.
#[derive(Debug, Clone, PartialEq)]
pub struct Queue {
    /// Name (a subject token).
    pub name: String,
    /// Settings.
    pub settings: QueueSettings,
    /// Whether releases to workers are paused.
    pub paused: bool,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When its settings last changed.
    pub updated_at: DateTime<Utc>,
}

/// Live figures of a queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Scheduled, not due yet.
    pub scheduled: u64,
    /// Due and not started.
    pub waiting: u64,
    /// Running.
    pub running: u64,
    /// Waiting for another attempt.
    pub retrying: u64,
    /// Succeeded in the last hour.
    pub succeeded_last_hour: u64,
    /// Failed attempts in the last hour.
    pub failed_last_hour: u64,
    /// Dead in the last hour.
    pub dead_last_hour: u64,
    /// Due time of the oldest waiting task.
    pub oldest_waiting_due: Option<DateTime<Utc>>,
}

/// A settings change: the new values of the fields named in the mask.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueUpdate {
    /// New global concurrency.
    pub max_concurrency: Option<u32>,
    /// New default attempts.
    pub max_attempts: Option<u32>,
    /// New first backoff.
    pub initial_backoff_ms: Option<i64>,
    /// New longest backoff.
    pub max_backoff_ms: Option<i64>,
    /// New multiplier.
    pub multiplier: Option<f64>,
    /// New jitter.
    pub jitter: Option<f64>,
    /// New run timeout.
    pub run_timeout_ms: Option<i64>,
    /// New default start deadline (`Some(None)` clears it).
    pub expire_after_ms: Option<Option<i64>>,
    /// New rate limit.
    pub rate_per_s: Option<f64>,
    /// New burst.
    pub rate_burst: Option<u32>,
}

/// Highest global concurrency a queue may ask for (JetStream's pending limit).
pub const MAX_CONCURRENCY: u32 = wire::UNLIMITED_ACK_PENDING as u32;
const MIN_RUN_TIMEOUT_MS: i64 = 1_000;
const MAX_RATE: f64 = 1_000_000.0;
const MAX_BURST: u32 = 1_000_000;
const MAX_RUN_TIMEOUT_MS: i64 = 24 * 3600 * 1000;

/// Checks a queue name.
pub fn validate_queue_name(name: &str) -> Result<(), ValidationError> {
    if wire::is_valid_queue(name) {
        Ok(())
    } else {
        Err(ValidationError::invalid(
            "name",
            format!(
                "must be 1 to {} characters of A-Z, a-z, 0-9, '_' and '-'",
                wire::MAX_QUEUE_LEN
            ),
        ))
    }
}

impl QueueSettings {
    /// Checks settings as a whole, naming the field at fault.
    pub fn validate(&self, max_attempts_limit: u32) -> Result<(), ValidationError> {
        let bad = |field: &str, reason: String| Err(ValidationError::invalid(field, reason));
        if self.max_concurrency > MAX_CONCURRENCY {
            return bad(
                "settings.max_concurrency",
                format!("must be at most {MAX_CONCURRENCY} (0 for no limit)"),
            );
        }
        let retry = &self.retry;
        if retry.max_attempts == 0 || retry.max_attempts > max_attempts_limit {
            return bad(
                "settings.retry.max_attempts",
                format!("must be 1 to {max_attempts_limit}"),
            );
        }
        if retry.initial_backoff_ms < 0 {
            return bad(
                "settings.retry.initial_backoff",
                "must not be negative".into(),
            );
        }
        if retry.max_backoff_ms < retry.initial_backoff_ms {
            return bad(
                "settings.retry.max_backoff",
                "must not be below initial_backoff".into(),
            );
        }
        if !(1.0..=10.0).contains(&retry.multiplier) {
            return bad("settings.retry.multiplier", "must be 1 to 10".into());
        }
        if !(0.0..=1.0).contains(&retry.jitter) {
            return bad("settings.retry.jitter", "must be 0 to 1".into());
        }
        if !(MIN_RUN_TIMEOUT_MS..=MAX_RUN_TIMEOUT_MS).contains(&self.run_timeout_ms) {
            return bad("settings.run_timeout", "must be 1s to 24h".into());
        }
        if !(0.0..=MAX_RATE).contains(&self.rate_per_s) || self.rate_per_s.is_nan() {
            return bad(
                "settings.rate_limit",
                format!("must be 0 (no limit) to {MAX_RATE} per second"),
            );
        }
        if self.rate_burst == 0 || self.rate_burst > MAX_BURST {
            return bad("settings.rate_burst", format!("must be 1 to {MAX_BURST}"));
        }
        if let Some(ms) = self.expire_after_ms
            && ms <= 0
        {
            return bad("settings.expire_after", "must be positive when set".into());
        }
        Ok(())
    }

    /// Returns these settings with `update` applied.
    pub fn with(&self, update: &QueueUpdate) -> Self {
        let mut next = self.clone();
        if let Some(v) = update.max_concurrency {
            next.max_concurrency = v;
        }
        if let Some(v) = update.max_attempts {
            next.retry.max_attempts = v;
        }
        if let Some(v) = update.initial_backoff_ms {
            next.retry.initial_backoff_ms = v;
        }
        if let Some(v) = update.max_backoff_ms {
            next.retry.max_backoff_ms = v;
        }
        if let Some(v) = update.multiplier {
            next.retry.multiplier = v;
        }
        if let Some(v) = update.jitter {
            next.retry.jitter = v;
        }
        if let Some(v) = update.run_timeout_ms {
            next.run_timeout_ms = v;
        }
        if let Some(v) = update.expire_after_ms {
            next.expire_after_ms = v;
        }
        if let Some(v) = update.rate_per_s {
            next.rate_per_s = v;
        }
        if let Some(v) = update.rate_burst {
            next.rate_burst = v;
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> QueueSettings {
        QueueSettings {
            max_concurrency: 2,
            retry: RetryPolicy {
                max_attempts: 3,
                initial_backoff_ms: 1000,
                max_backoff_ms: 60_000,
                multiplier: 2.0,
                jitter: 0.2,
            },
            run_timeout_ms: 30_000,
            expire_after_ms: None,
            rate_per_s: 0.0,
            rate_burst: 1,
        }
    }

    #[test]
    fn bad_settings_name_their_field() {
        assert!(settings().validate(100).is_ok());
        let field = |s: QueueSettings| s.validate(100).unwrap_err().field;
        let mut s = settings();
        s.retry.max_attempts = 0;
        assert_eq!(field(s), "settings.retry.max_attempts");
        let mut s = settings();
        s.retry.max_backoff_ms = 10;
        assert_eq!(field(s), "settings.retry.max_backoff");
        let mut s = settings();
        s.retry.jitter = 1.5;
        assert_eq!(field(s), "settings.retry.jitter");
        let mut s = settings();
        s.run_timeout_ms = 10;
        assert_eq!(field(s), "settings.run_timeout");
        let mut s = settings();
        s.max_concurrency = MAX_CONCURRENCY + 1;
        assert_eq!(field(s), "settings.max_concurrency");
        let mut s = settings();
        s.rate_per_s = -1.0;
        assert_eq!(field(s), "settings.rate_limit");
        let mut s = settings();
        s.rate_burst = 0;
        assert_eq!(field(s), "settings.rate_burst");
    }

    #[test]
    fn an_update_changes_only_what_it_names() {
        let update = QueueUpdate {
            max_concurrency: Some(5),
            expire_after_ms: Some(Some(1000)),
            ..Default::default()
        };
        let next = settings().with(&update);
        assert_eq!(next.max_concurrency, 5);
        assert_eq!(next.expire_after_ms, Some(1000));
        assert_eq!(next.retry, settings().retry);
    }
}

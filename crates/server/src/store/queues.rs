//! SQL storage of queue settings and the live figures of a queue, for SQLite
//! and Postgres from one text (as in [`super::sql`]).

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::sql::{PgStore, SqliteStore};
use super::{StoreResult, ms_to_time};
use crate::domain::{Queue, QueueSettings, QueueStats, RetryPolicy, TaskState};

/// The SQL queue table.
#[tonic::async_trait]
pub trait QueueStore: Send + Sync {
    /// Stores a new queue; false when one of that name exists.
    async fn insert_queue(&self, queue: &Queue) -> StoreResult<bool>;

    /// Returns one queue.
    async fn get_queue(&self, name: &str) -> StoreResult<Option<Queue>>;

    /// Returns every queue, by name.
    async fn list_queues(&self) -> StoreResult<Vec<Queue>>;

    /// Replaces a queue's settings; false when unknown.
    async fn update_queue(
        &self,
        name: &str,
        settings: &QueueSettings,
        now: DateTime<Utc>,
    ) -> StoreResult<bool>;

    /// Pauses or resumes a queue; false when unknown.
    async fn set_queue_paused(
        &self,
        name: &str,
        paused: bool,
        now: DateTime<Utc>,
    ) -> StoreResult<bool>;

    /// Counts a queue's tasks by where they are, as of `now`.
    async fn queue_stats(&self, name: &str, now: DateTime<Utc>) -> StoreResult<QueueStats>;
}

const QUEUE_COLUMNS: &str = "name, max_concurrency, max_attempts, initial_backoff_ms, \
     max_backoff_ms, backoff_multiplier, backoff_jitter, run_timeout_ms, expire_after_ms, rate_per_s, \
     rate_burst, paused, created_at_ms, updated_at_ms";

fn queue_from_row<R: Row>(row: &R) -> StoreResult<Queue>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> f64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let count = |v: i64| u32::try_from(v).unwrap_or(u32::MAX);
    Ok(Queue {
        name: row.try_get("name")?,
        settings: QueueSettings {
            max_concurrency: count(row.try_get("max_concurrency")?),
            retry: RetryPolicy {
                max_attempts: count(row.try_get("max_attempts")?),
                initial_backoff_ms: row.try_get("initial_backoff_ms")?,
                max_backoff_ms: row.try_get("max_backoff_ms")?,
                multiplier: row.try_get("backoff_multiplier")?,
                jitter: row.try_get("backoff_jitter")?,
            },
            run_timeout_ms: row.try_get("run_timeout_ms")?,
            expire_after_ms: row.try_get("expire_after_ms")?,
            rate_per_s: row.try_get("rate_per_s")?,
            rate_burst: count(row.try_get("rate_burst")?),
        },
        paused: row.try_get::<i64, _>("paused")? != 0,
        created_at: ms_to_time("queues", row.try_get("created_at_ms")?)?,
        updated_at: ms_to_time("queues", row.try_get("updated_at_ms")?)?,
    })
}

/// Binds the settings columns, in `QUEUE_COLUMNS` order after the name.
macro_rules! bind_settings {
    ($query:expr, $s:expr) => {
        $query
            .bind(i64::from($s.max_concurrency))
            .bind(i64::from($s.retry.max_attempts))
            .bind($s.retry.initial_backoff_ms)
            .bind($s.retry.max_backoff_ms)
            .bind($s.retry.multiplier)
            .bind($s.retry.jitter)
            .bind($s.run_timeout_ms)
            .bind($s.expire_after_ms)
            .bind($s.rate_per_s)
            .bind(i64::from($s.rate_burst))
    };
}

macro_rules! impl_queue_store {
    ($store:ty) => {
        #[tonic::async_trait]
        impl QueueStore for $store {
            async fn insert_queue(&self, queue: &Queue) -> StoreResult<bool> {
                let s = &queue.settings;
                let query = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO queues ({QUEUE_COLUMNS}) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
                     ON CONFLICT (name) DO NOTHING"
                )))
                .bind(queue.name.clone());
                let inserted = bind_settings!(query, s)
                .bind(i64::from(queue.paused))
                .bind(queue.created_at.timestamp_millis())
                .bind(queue.updated_at.timestamp_millis())
                .execute(self.writer())
                .await?
                .rows_affected();
                Ok(inserted == 1)
            }

            async fn get_queue(&self, name: &str) -> StoreResult<Option<Queue>> {
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {QUEUE_COLUMNS} FROM queues WHERE name = $1"
                )))
                .bind(name.to_owned())
                .fetch_optional(&self.pool)
                .await?;
                row.as_ref().map(queue_from_row).transpose()
            }

            async fn list_queues(&self) -> StoreResult<Vec<Queue>> {
                let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {QUEUE_COLUMNS} FROM queues ORDER BY name"
                )))
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(queue_from_row).collect()
            }

            async fn update_queue(
                &self,
                name: &str,
                s: &QueueSettings,
                now: DateTime<Utc>,
            ) -> StoreResult<bool> {
                let query = sqlx::query(
                    "UPDATE queues SET max_concurrency = $1, max_attempts = $2, \
                     initial_backoff_ms = $3, max_backoff_ms = $4, backoff_multiplier = $5, \
                     backoff_jitter = $6, run_timeout_ms = $7, expire_after_ms = $8, \
                     rate_per_s = $9, rate_burst = $10, updated_at_ms = $11 WHERE name = $12",
                );
                let updated = bind_settings!(query, s)
                .bind(now.timestamp_millis())
                .bind(name.to_owned())
                .execute(self.writer())
                .await?
                .rows_affected();
                Ok(updated == 1)
            }

            async fn set_queue_paused(
                &self,
                name: &str,
                paused: bool,
                now: DateTime<Utc>,
            ) -> StoreResult<bool> {
                let updated = sqlx::query(
                    "UPDATE queues SET paused = $1, updated_at_ms = $2 WHERE name = $3",
                )
                .bind(i64::from(paused))
                .bind(now.timestamp_millis())
                .bind(name.to_owned())
                .execute(self.writer())
                .await?
                .rows_affected();
                Ok(updated == 1)
            }

            async fn queue_stats(&self, name: &str, now: DateTime<Utc>) -> StoreResult<QueueStats> {
                let now_ms = now.timestamp_millis();
                let hour_ago = now_ms - 3600 * 1000;
                let count = |v: i64| u64::try_from(v).unwrap_or(0);
                let row = sqlx::query(
                    "SELECT \
                     SUM(CASE WHEN state = $2 AND due_at_ms > $6 THEN 1 ELSE 0 END) AS scheduled, \
                     SUM(CASE WHEN (state = $2 AND due_at_ms <= $6) OR state = $3 THEN 1 ELSE 0 END) AS waiting, \
                     MIN(CASE WHEN (state = $2 AND due_at_ms <= $6) OR state = $3 THEN due_at_ms END) AS oldest, \
                     SUM(CASE WHEN state = $4 THEN 1 ELSE 0 END) AS running, \
                     SUM(CASE WHEN state = $5 THEN 1 ELSE 0 END) AS retrying \
                     FROM tasks WHERE queue = $1 AND state IN ($2, $3, $4, $5)",
                )
                .bind(name.to_owned())
                .bind(TaskState::Scheduled.as_str())
                .bind(TaskState::Dispatched.as_str())
                .bind(TaskState::Running.as_str())
                .bind(TaskState::Retrying.as_str())
                .bind(now_ms)
                .fetch_one(&self.pool)
                .await?;
                let sum = |column: &str| -> StoreResult<u64> {
                    Ok(count(row.try_get::<Option<i64>, _>(column)?.unwrap_or(0)))
                };
                let mut stats = QueueStats {
                    scheduled: sum("scheduled")?,
                    waiting: sum("waiting")?,
                    running: sum("running")?,
                    retrying: sum("retrying")?,
                    oldest_waiting_due: row
                        .try_get::<Option<i64>, _>("oldest")?
                        .map(|ms| ms_to_time("tasks", ms))
                        .transpose()?,
                    ..QueueStats::default()
                };
                let row = sqlx::query(
                    "SELECT \
                     SUM(CASE WHEN state = $2 THEN 1 ELSE 0 END) AS succeeded, \
                     SUM(CASE WHEN state = $3 THEN 1 ELSE 0 END) AS dead \
                     FROM tasks WHERE queue = $1 AND state IN ($2, $3) AND updated_at_ms >= $4",
                )
                .bind(name.to_owned())
                .bind(TaskState::Succeeded.as_str())
                .bind(TaskState::Dead.as_str())
                .bind(hour_ago)
                .fetch_one(&self.pool)
                .await?;
                stats.succeeded_last_hour = count(row.try_get::<Option<i64>, _>("succeeded")?.unwrap_or(0));
                stats.dead_last_hour = count(row.try_get::<Option<i64>, _>("dead")?.unwrap_or(0));
                let row = sqlx::query(
                    "SELECT COUNT(*) AS failed FROM task_runs r JOIN tasks t ON t.id = r.task_id \
                     WHERE t.queue = $1 AND r.outcome IN ('failed', 'terminal') \
                     AND r.finished_at_ms >= $2",
                )
                .bind(name.to_owned())
                .bind(hour_ago)
                .fetch_one(&self.pool)
                .await?;
                stats.failed_last_hour = count(row.try_get::<i64, _>("failed")?);
                Ok(stats)
            }
        }
    };
}

impl_queue_store!(SqliteStore);
impl_queue_store!(PgStore);

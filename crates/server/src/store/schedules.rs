//! SQL storage of recurring schedules, for SQLite and Postgres from one text
//! (as in [`super::sql`]). The materializer advances `next_fire_at_ms` with a
//! compare-and-set, so replicas never make an occurrence twice.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use sqlx::Row;

use super::sql::{PgStore, SqliteStore};
use super::{StoreError, StoreResult, ms_to_time};
use crate::domain::{CatchUp, MissingDay, Overlap, Schedule, TaskId};

/// What inserting a schedule did.
#[derive(Debug, Clone, PartialEq)]
pub enum ScheduleInsert {
    /// Stored.
    Inserted,
    /// Its idempotency key was used with the same content: this is that schedule.
    Existing(Box<Schedule>),
    /// Its idempotency key was used with other content.
    Conflict {
        /// The key.
        key: String,
    },
}

/// Filter and page of ListRecurring.
#[derive(Debug, Clone, Default)]
pub struct ScheduleFilter {
    /// Only this queue.
    pub queue: Option<String>,
    /// Only paused (true) or running (false) schedules.
    pub paused: Option<bool>,
    /// Only ids below this one (newest first).
    pub before: Option<TaskId>,
    /// Page size.
    pub limit: u32,
}

/// The SQL schedule table.
#[tonic::async_trait]
pub trait ScheduleStore: Send + Sync {
    /// Stores a new schedule, unless its idempotency key is taken.
    async fn insert_schedule(&self, schedule: &Schedule) -> StoreResult<ScheduleInsert>;

    /// Returns one schedule.
    async fn get_schedule(&self, id: TaskId) -> StoreResult<Option<Schedule>>;

    /// Returns one page of schedules, newest first.
    async fn list_schedules(&self, filter: &ScheduleFilter) -> StoreResult<Vec<Schedule>>;

    /// Pauses or resumes a schedule; returns it, or `None` when unknown.
    async fn set_paused(
        &self,
        id: TaskId,
        paused: bool,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Schedule>>;

    /// Replaces a schedule's definition and next fire time, only if its next
    /// fire time is still `expected` (the materializer did not move it meanwhile).
    async fn update_schedule(
        &self,
        schedule: &Schedule,
        expected: Option<DateTime<Utc>>,
    ) -> StoreResult<bool>;

    /// Deletes a schedule; false when unknown.
    async fn delete_schedule(&self, id: TaskId) -> StoreResult<bool>;

    /// Returns running schedules whose next fire time is at or before `until`, soonest first.
    async fn due_schedules(&self, until: DateTime<Utc>, limit: u32) -> StoreResult<Vec<Schedule>>;

    /// Moves a schedule's next fire time from `expected` to `next` and adds
    /// `made` occurrences, only if no one else moved it first; true when this
    /// call did.
    async fn advance_schedule(
        &self,
        id: TaskId,
        expected: DateTime<Utc>,
        next: Option<DateTime<Utc>>,
        made: u64,
        now: DateTime<Utc>,
    ) -> StoreResult<bool>;
}

const COLUMNS: &str = "id, queue, payload, content_type, headers, spec, time_zone, missing_day, \
     start_at_ms, end_at_ms, max_occurrences, jitter_ms, catch_up, catch_up_limit, \
     expire_after_ms, max_attempts, idempotency_key, content_hash, paused, occurrences, \
     next_fire_at_ms, created_at_ms, updated_at_ms, overlap";

fn schedule_from_row<R: Row>(row: &R) -> StoreResult<Schedule>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Vec<u8>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> bool: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let corrupt = |reason: String| StoreError::Corrupt {
        table: "schedules",
        reason,
    };
    let time = |ms: i64| ms_to_time("schedules", ms);
    let id: String = row.try_get("id")?;
    let headers: String = row.try_get("headers")?;
    let missing_day: String = row.try_get("missing_day")?;
    let catch_up: String = row.try_get("catch_up")?;
    let overlap: String = row.try_get("overlap")?;
    let count = |name: &str| -> StoreResult<i64> { Ok(row.try_get::<i64, _>(name)?) };
    Ok(Schedule {
        id: TaskId::from_str(&id).map_err(|e| corrupt(format!("bad id `{id}`: {e}")))?,
        queue: row.try_get("queue")?,
        payload: Bytes::from(row.try_get::<Vec<u8>, _>("payload")?),
        content_type: row.try_get("content_type")?,
        headers: serde_json::from_str::<BTreeMap<String, String>>(&headers)
            .map_err(|e| corrupt(format!("bad headers: {e}")))?,
        spec: row.try_get("spec")?,
        time_zone: row.try_get("time_zone")?,
        missing_day: MissingDay::parse(&missing_day)
            .ok_or_else(|| corrupt(format!("bad missing_day `{missing_day}`")))?,
        start_at: time(count("start_at_ms")?)?,
        end_at: row
            .try_get::<Option<i64>, _>("end_at_ms")?
            .map(time)
            .transpose()?,
        max_occurrences: u32::try_from(count("max_occurrences")?).unwrap_or(u32::MAX),
        jitter: Duration::from_millis(u64::try_from(count("jitter_ms")?).unwrap_or(0)),
        catch_up: CatchUp::parse(&catch_up)
            .ok_or_else(|| corrupt(format!("bad catch_up `{catch_up}`")))?,
        catch_up_limit: u32::try_from(count("catch_up_limit")?).unwrap_or(u32::MAX),
        overlap: Overlap::parse(&overlap)
            .ok_or_else(|| corrupt(format!("bad overlap `{overlap}`")))?,
        expire_after_ms: row.try_get("expire_after_ms")?,
        max_attempts: u32::try_from(count("max_attempts")?).unwrap_or(u32::MAX),
        idempotency_key: row.try_get("idempotency_key")?,
        content_hash: row.try_get("content_hash")?,
        paused: row.try_get("paused")?,
        occurrences: u64::try_from(count("occurrences")?).unwrap_or(0),
        next_fire_at: row
            .try_get::<Option<i64>, _>("next_fire_at_ms")?
            .map(time)
            .transpose()?,
        created_at: time(count("created_at_ms")?)?,
        updated_at: time(count("updated_at_ms")?)?,
    })
}

/// The headers column: a JSON object.
fn headers_json(s: &Schedule) -> StoreResult<String> {
    serde_json::to_string(&s.headers).map_err(|e| StoreError::Corrupt {
        table: "schedules",
        reason: format!("headers: {e}"),
    })
}

macro_rules! impl_schedule_store {
    ($store:ty) => {
        #[tonic::async_trait]
        impl ScheduleStore for $store {
            async fn insert_schedule(&self, s: &Schedule) -> StoreResult<ScheduleInsert> {
                let headers = headers_json(s)?;
                let mut tx = self.pool.begin().await?;
                let inserted = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO schedules ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, \
                     $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24) \
                     ON CONFLICT (idempotency_key) DO NOTHING"
                )))
                .bind(s.id.to_string())
                .bind(s.queue.clone())
                .bind(s.payload.to_vec())
                .bind(s.content_type.clone())
                .bind(headers)
                .bind(s.spec.clone())
                .bind(s.time_zone.clone())
                .bind(s.missing_day.as_str())
                .bind(s.start_at.timestamp_millis())
                .bind(s.end_at.map(|t| t.timestamp_millis()))
                .bind(i64::from(s.max_occurrences))
                .bind(s.jitter.as_millis() as i64)
                .bind(s.catch_up.as_str())
                .bind(i64::from(s.catch_up_limit))
                .bind(s.expire_after_ms)
                .bind(i64::from(s.max_attempts))
                .bind(s.idempotency_key.clone())
                .bind(s.content_hash.clone())
                .bind(s.paused)
                .bind(s.occurrences as i64)
                .bind(s.next_fire_at.map(|t| t.timestamp_millis()))
                .bind(s.created_at.timestamp_millis())
                .bind(s.updated_at.timestamp_millis())
                .bind(s.overlap.as_str())
                .execute(&mut *tx)
                .await?
                .rows_affected();
                let outcome = if inserted == 1 {
                    ScheduleInsert::Inserted
                } else {
                    let key = s.idempotency_key.clone().unwrap_or_default();
                    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "SELECT {COLUMNS} FROM schedules WHERE idempotency_key = $1"
                    )))
                    .bind(key.clone())
                    .fetch_one(&mut *tx)
                    .await?;
                    let existing = schedule_from_row(&row)?;
                    if existing.content_hash == s.content_hash {
                        ScheduleInsert::Existing(Box::new(existing))
                    } else {
                        ScheduleInsert::Conflict { key }
                    }
                };
                tx.commit().await?;
                Ok(outcome)
            }

            async fn get_schedule(&self, id: TaskId) -> StoreResult<Option<Schedule>> {
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {COLUMNS} FROM schedules WHERE id = $1"
                )))
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await?;
                row.as_ref().map(schedule_from_row).transpose()
            }

            async fn list_schedules(&self, filter: &ScheduleFilter) -> StoreResult<Vec<Schedule>> {
                let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {COLUMNS} FROM schedules \
                     WHERE ($1 = '' OR queue = $1) AND ($2 = -1 OR paused = ($2 = 1)) \
                       AND ($3 = '' OR id < $3) \
                     ORDER BY id DESC LIMIT $4"
                )))
                .bind(filter.queue.clone().unwrap_or_default())
                .bind(filter.paused.map_or(-1_i64, i64::from))
                .bind(filter.before.map(|id| id.to_string()).unwrap_or_default())
                .bind(i64::from(filter.limit))
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(schedule_from_row).collect()
            }

            async fn set_paused(
                &self,
                id: TaskId,
                paused: bool,
                now: DateTime<Utc>,
            ) -> StoreResult<Option<Schedule>> {
                sqlx::query("UPDATE schedules SET paused = $1, updated_at_ms = $2 WHERE id = $3")
                    .bind(paused)
                    .bind(now.timestamp_millis())
                    .bind(id.to_string())
                    .execute(&self.pool)
                    .await?;
                self.get_schedule(id).await
            }

            async fn update_schedule(
                &self,
                s: &Schedule,
                expected: Option<DateTime<Utc>>,
            ) -> StoreResult<bool> {
                let headers = headers_json(s)?;
                let updated = sqlx::query(
                    "UPDATE schedules SET payload = $1, content_type = $2, headers = $3, spec = $4, \
                     time_zone = $5, missing_day = $6, end_at_ms = $7, max_occurrences = $8, \
                     jitter_ms = $9, catch_up = $10, catch_up_limit = $11, expire_after_ms = $12, \
                     max_attempts = $13, next_fire_at_ms = $14, updated_at_ms = $15, overlap = $16 \
                     WHERE id = $17 AND (next_fire_at_ms = $18 OR (next_fire_at_ms IS NULL AND $19 = 1))",
                )
                .bind(s.payload.to_vec())
                .bind(s.content_type.clone())
                .bind(headers)
                .bind(s.spec.clone())
                .bind(s.time_zone.clone())
                .bind(s.missing_day.as_str())
                .bind(s.end_at.map(|t| t.timestamp_millis()))
                .bind(i64::from(s.max_occurrences))
                .bind(s.jitter.as_millis() as i64)
                .bind(s.catch_up.as_str())
                .bind(i64::from(s.catch_up_limit))
                .bind(s.expire_after_ms)
                .bind(i64::from(s.max_attempts))
                .bind(s.next_fire_at.map(|t| t.timestamp_millis()))
                .bind(s.updated_at.timestamp_millis())
                .bind(s.overlap.as_str())
                .bind(s.id.to_string())
                .bind(expected.map_or(-1, |t| t.timestamp_millis()))
                .bind(i64::from(expected.is_none()))
                .execute(&self.pool)
                .await?
                .rows_affected();
                Ok(updated == 1)
            }

            async fn delete_schedule(&self, id: TaskId) -> StoreResult<bool> {
                let deleted = sqlx::query("DELETE FROM schedules WHERE id = $1")
                    .bind(id.to_string())
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
                Ok(deleted == 1)
            }

            async fn due_schedules(
                &self,
                until: DateTime<Utc>,
                limit: u32,
            ) -> StoreResult<Vec<Schedule>> {
                let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {COLUMNS} FROM schedules \
                     WHERE paused = $1 AND next_fire_at_ms IS NOT NULL AND next_fire_at_ms <= $2 \
                     ORDER BY next_fire_at_ms LIMIT $3"
                )))
                .bind(false)
                .bind(until.timestamp_millis())
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(schedule_from_row).collect()
            }

            async fn advance_schedule(
                &self,
                id: TaskId,
                expected: DateTime<Utc>,
                next: Option<DateTime<Utc>>,
                made: u64,
                now: DateTime<Utc>,
            ) -> StoreResult<bool> {
                let moved = sqlx::query(
                    "UPDATE schedules SET next_fire_at_ms = $1, occurrences = occurrences + $2, \
                     updated_at_ms = $3 WHERE id = $4 AND next_fire_at_ms = $5",
                )
                .bind(next.map(|t| t.timestamp_millis()))
                .bind(made as i64)
                .bind(now.timestamp_millis())
                .bind(id.to_string())
                .bind(expected.timestamp_millis())
                .execute(&self.pool)
                .await?
                .rows_affected();
                Ok(moved == 1)
            }
        }
    };
}

impl_schedule_store!(SqliteStore);
impl_schedule_store!(PgStore);

//! SQL storage of recurring schedules, for SQLite and Postgres from one text
//! (as in [`super::sql`]). The materializer advances `next_fire_at_ms` with a
//! compare-and-set, so replicas never make an occurrence twice.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use sqlx::Row;

use super::sql::{PgStore, SqliteStore};
use super::{StoreError, StoreResult, id_from_text, ms_to_time};
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
        id: id_from_text("schedules", &id)?,
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

/// Columns that describe what a schedule does (UpdateRecurring rewrites
/// them), in the order `bind_definition!` binds them.
const DEFINITION: [&str; 16] = [
    "payload",
    "content_type",
    "headers",
    "spec",
    "time_zone",
    "missing_day",
    "end_at_ms",
    "max_occurrences",
    "jitter_ms",
    "catch_up",
    "catch_up_limit",
    "expire_after_ms",
    "max_attempts",
    "overlap",
    "next_fire_at_ms",
    "updated_at_ms",
];

/// Every column, as SELECT lists them.
static COLUMNS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    IDENTITY
        .iter()
        .chain(&DEFINITION)
        .copied()
        .collect::<Vec<_>>()
        .join(", ")
});

/// Identity and progress columns, bound first on insert.
const IDENTITY: [&str; 8] = [
    "id",
    "queue",
    "start_at_ms",
    "idempotency_key",
    "content_hash",
    "paused",
    "occurrences",
    "created_at_ms",
];

static INSERT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let values: Vec<String> = (1..=IDENTITY.len() + DEFINITION.len())
        .map(|n| format!("${n}"))
        .collect();
    format!(
        "INSERT INTO schedules ({}) VALUES ({}) ON CONFLICT (idempotency_key) DO NOTHING",
        COLUMNS.as_str(),
        values.join(", ")
    )
});

// The definition is rewritten only while `next_fire_at_ms` is still what the
// caller read (a compare-and-set against the materializer).
static UPDATE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let n = DEFINITION.len();
    let set: Vec<String> = DEFINITION
        .iter()
        .enumerate()
        .map(|(i, column)| format!("{column} = ${}", i + 1))
        .collect();
    format!(
        "UPDATE schedules SET {} WHERE id = ${} AND (next_fire_at_ms = ${} \
         OR (next_fire_at_ms IS NULL AND ${} = 1))",
        set.join(", "),
        n + 1,
        n + 2,
        n + 3
    )
});

/// Binds the `DEFINITION` columns of schedule `$s` to `$query`, in order.
macro_rules! bind_definition {
    ($query:expr, $s:expr, $headers:expr) => {
        $query
            .bind($s.payload.to_vec())
            .bind($s.content_type.clone())
            .bind($headers)
            .bind($s.spec.clone())
            .bind($s.time_zone.clone())
            .bind($s.missing_day.as_str())
            .bind($s.end_at.map(|t| t.timestamp_millis()))
            .bind(i64::from($s.max_occurrences))
            .bind($s.jitter.as_millis() as i64)
            .bind($s.catch_up.as_str())
            .bind(i64::from($s.catch_up_limit))
            .bind($s.expire_after_ms)
            .bind(i64::from($s.max_attempts))
            .bind($s.overlap.as_str())
            .bind($s.next_fire_at.map(|t| t.timestamp_millis()))
            .bind($s.updated_at.timestamp_millis())
    };
}

macro_rules! impl_schedule_store {
    ($store:ty) => {
        #[tonic::async_trait]
        impl ScheduleStore for $store {
            async fn insert_schedule(&self, s: &Schedule) -> StoreResult<ScheduleInsert> {
                let headers = headers_json(s)?;
                let mut tx = self.writer().begin().await?;
                let inserted = bind_definition!(
                    sqlx::query(sqlx::AssertSqlSafe(INSERT.as_str()))
                        .bind(s.id.to_string())
                        .bind(s.queue.clone())
                        .bind(s.start_at.timestamp_millis())
                        .bind(s.idempotency_key.clone())
                        .bind(s.content_hash.clone())
                        .bind(s.paused)
                        .bind(s.occurrences as i64)
                        .bind(s.created_at.timestamp_millis()),
                    s,
                    headers
                )
                .execute(&mut *tx)
                .await?
                .rows_affected();
                let outcome = if inserted == 1 {
                    ScheduleInsert::Inserted
                } else {
                    let key = s.idempotency_key.clone().unwrap_or_default();
                    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "SELECT {columns} FROM schedules WHERE idempotency_key = $1",
                        columns = COLUMNS.as_str()
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
                    "SELECT {columns} FROM schedules WHERE id = $1",
                    columns = COLUMNS.as_str()
                )))
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await?;
                row.as_ref().map(schedule_from_row).transpose()
            }

            async fn list_schedules(&self, filter: &ScheduleFilter) -> StoreResult<Vec<Schedule>> {
                let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {columns} FROM schedules \
                     WHERE ($1 = '' OR queue = $1) AND ($2 = -1 OR paused = ($2 = 1)) \
                       AND ($3 = '' OR id < $3) \
                     ORDER BY id DESC LIMIT $4",
                    columns = COLUMNS.as_str()
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
                    .execute(self.writer())
                    .await?;
                self.get_schedule(id).await
            }

            async fn update_schedule(
                &self,
                s: &Schedule,
                expected: Option<DateTime<Utc>>,
            ) -> StoreResult<bool> {
                let headers = headers_json(s)?;
                let updated = bind_definition!(
                    sqlx::query(sqlx::AssertSqlSafe(UPDATE.as_str())),
                    s,
                    headers
                )
                .bind(s.id.to_string())
                .bind(expected.map_or(-1, |t| t.timestamp_millis()))
                .bind(i64::from(expected.is_none()))
                .execute(self.writer())
                .await?
                .rows_affected();
                Ok(updated == 1)
            }

            async fn delete_schedule(&self, id: TaskId) -> StoreResult<bool> {
                let deleted = sqlx::query("DELETE FROM schedules WHERE id = $1")
                    .bind(id.to_string())
                    .execute(self.writer())
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
                    "SELECT {columns} FROM schedules \
                     WHERE paused = $1 AND next_fire_at_ms IS NOT NULL AND next_fire_at_ms <= $2 \
                     ORDER BY next_fire_at_ms LIMIT $3",
                    columns = COLUMNS.as_str()
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
                .execute(self.writer())
                .await?
                .rows_affected();
                Ok(moved == 1)
            }
        }
    };
}

impl_schedule_store!(SqliteStore);
impl_schedule_store!(PgStore);

//! One SQL implementation, generated for SQLite and for Postgres by a macro:
//! the statements are portable (`$n` parameters, `ON CONFLICT`, `excluded`),
//! so both backends run the very same text and pass the same conformance tests.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Pool, Postgres, Row, Sqlite};

use super::{DynStore, InsertOutcome, StoreError, StoreResult, TaskFilter, TaskStore, ms_to_time};
use crate::domain::{
    AttemptOutcome, AttemptRecord, NewTask, StatusWrite, TaskId, TaskRecord, TaskState, version_of,
};

/// Migrations of the SQLite backend.
pub static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");
/// Migrations of the Postgres backend.
pub static PG_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

/// The SQLite store (the default: one file, WAL, synchronous=FULL).
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: Pool<Sqlite>,
}

/// The Postgres store (for several replicas).
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: Pool<Postgres>,
}

/// Connects to `url` (`sqlite://…` or `postgres://…`), applies migrations and
/// returns the store.
pub async fn connect(url: &str) -> StoreResult<DynStore> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let options = PgConnectOptions::from_str(url)?.options([("synchronous_commit", "on")]);
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        PG_MIGRATOR.run(&pool).await?;
        Ok(Arc::new(PgStore { pool }))
    } else {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10));
        if let Some(parent) = options.get_filename().parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(sqlx::Error::Io)?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        SQLITE_MIGRATOR.run(&pool).await?;
        Ok(Arc::new(SqliteStore { pool }))
    }
}

const TASK_COLUMNS: &str = "id, queue, state, due_at_ms, bucket_ms, expire_at_ms, max_attempts, \
     attempts, idempotency_key, content_type, payload_size, last_error, created_at_ms, updated_at_ms";

fn task_from_row<R: Row>(row: &R) -> StoreResult<TaskRecord>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let corrupt = |reason: String| StoreError::Corrupt {
        table: "tasks",
        reason,
    };
    let id: String = row.try_get("id")?;
    let state: String = row.try_get("state")?;
    let expire_at_ms: Option<i64> = row.try_get("expire_at_ms")?;
    Ok(TaskRecord {
        id: TaskId::from_str(&id).map_err(|e| corrupt(format!("bad id `{id}`: {e}")))?,
        queue: row.try_get("queue")?,
        state: TaskState::parse(&state).ok_or_else(|| corrupt(format!("bad state `{state}`")))?,
        due_at: ms_to_time("tasks", row.try_get("due_at_ms")?)?,
        bucket_ms: row.try_get("bucket_ms")?,
        expire_at: expire_at_ms.map(|ms| ms_to_time("tasks", ms)).transpose()?,
        max_attempts: u32::try_from(row.try_get::<i64, _>("max_attempts")?).unwrap_or(u32::MAX),
        attempts: u32::try_from(row.try_get::<i64, _>("attempts")?).unwrap_or(u32::MAX),
        idempotency_key: row.try_get("idempotency_key")?,
        content_type: row.try_get("content_type")?,
        payload_size: u64::try_from(row.try_get::<i64, _>("payload_size")?).unwrap_or(0),
        last_error: row.try_get("last_error")?,
        created_at: ms_to_time("tasks", row.try_get("created_at_ms")?)?,
        updated_at: ms_to_time("tasks", row.try_get("updated_at_ms")?)?,
    })
}

fn attempt_from_row<R: Row>(row: &R) -> StoreResult<AttemptRecord>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let finished_at_ms: Option<i64> = row.try_get("finished_at_ms")?;
    let outcome: Option<String> = row.try_get("outcome")?;
    Ok(AttemptRecord {
        attempt: u32::try_from(row.try_get::<i64, _>("attempt")?).unwrap_or(u32::MAX),
        worker_id: row.try_get("worker_id")?,
        started_at: ms_to_time("task_runs", row.try_get("started_at_ms")?)?,
        finished_at: finished_at_ms
            .map(|ms| ms_to_time("task_runs", ms))
            .transpose()?,
        outcome: outcome.as_deref().and_then(AttemptOutcome::parse),
        error: row.try_get("error")?,
    })
}

macro_rules! impl_task_store {
    ($store:ty, $db:ty) => {
        impl $store {
            /// Moves a task to `state` unless it is already at or past that point.
            async fn set_state(
                tx: &mut sqlx::Transaction<'_, $db>,
                id: TaskId,
                state: TaskState,
                attempt: u32,
                error: Option<&str>,
                at: chrono::DateTime<chrono::Utc>,
            ) -> StoreResult<()> {
                sqlx::query(
                    "UPDATE tasks SET state = $1, version = $2, updated_at_ms = $3, \
                     attempts = CASE WHEN attempts < $4 THEN $4 ELSE attempts END, \
                     last_error = CASE WHEN $5 IS NULL THEN last_error ELSE $5 END \
                     WHERE id = $6 AND version < $2",
                )
                .bind(state.as_str())
                .bind(version_of(state, attempt))
                .bind(at.timestamp_millis())
                .bind(i64::from(attempt))
                .bind(error.map(str::to_owned))
                .bind(id.to_string())
                .execute(&mut **tx)
                .await?;
                Ok(())
            }
        }

        #[tonic::async_trait]
        impl TaskStore for $store {
            async fn insert_tasks(
                &self,
                tasks: &[NewTask],
                bucket_ms: &[i64],
            ) -> StoreResult<Vec<InsertOutcome>> {
                let mut tx = self.pool.begin().await?;
                let mut outcomes = Vec::with_capacity(tasks.len());
                for (task, bucket) in tasks.iter().zip(bucket_ms) {
                    let inserted = sqlx::query(
                        "INSERT INTO tasks (id, queue, state, version, due_at_ms, bucket_ms, \
                         expire_at_ms, max_attempts, attempts, idempotency_key, content_hash, \
                         content_type, payload_size, last_error, created_at_ms, updated_at_ms) \
                         VALUES ($1, $2, 'scheduled', 0, $3, $4, $5, $6, 0, $7, $8, $9, $10, NULL, $11, $11) \
                         ON CONFLICT (idempotency_key) DO NOTHING",
                    )
                    .bind(task.id.to_string())
                    .bind(task.queue.clone())
                    .bind(task.due_at.timestamp_millis())
                    .bind(*bucket)
                    .bind(task.expire_at.map(|t| t.timestamp_millis()))
                    .bind(i64::from(task.max_attempts))
                    .bind(task.idempotency_key.clone())
                    .bind(task.content_hash.clone())
                    .bind(task.content_type.clone())
                    .bind(task.payload.len() as i64)
                    .bind(task.created_at.timestamp_millis())
                    .execute(&mut *tx)
                    .await?;
                    if inserted.rows_affected() == 1 {
                        outcomes.push(InsertOutcome::Inserted);
                        continue;
                    }
                    // Only the idempotency key can conflict: ids are fresh UUIDv7s.
                    let key = task.idempotency_key.clone().unwrap_or_default();
                    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "SELECT {TASK_COLUMNS}, content_hash FROM tasks WHERE idempotency_key = $1"
                    )))
                    .bind(key.clone())
                    .fetch_one(&mut *tx)
                    .await?;
                    let hash: String = row.try_get("content_hash")?;
                    if hash == task.content_hash {
                        outcomes.push(InsertOutcome::Existing(task_from_row(&row)?));
                    } else {
                        outcomes.push(InsertOutcome::Conflict { key });
                    }
                }
                tx.commit().await?;
                Ok(outcomes)
            }

            async fn delete_tasks(&self, ids: &[TaskId]) -> StoreResult<()> {
                let mut tx = self.pool.begin().await?;
                for id in ids {
                    sqlx::query("DELETE FROM tasks WHERE id = $1")
                        .bind(id.to_string())
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn get_task(&self, id: TaskId) -> StoreResult<Option<TaskRecord>> {
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1"
                )))
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await?;
                row.as_ref().map(task_from_row).transpose()
            }

            async fn get_attempts(&self, id: TaskId) -> StoreResult<Vec<AttemptRecord>> {
                let rows = sqlx::query(
                    "SELECT attempt, worker_id, started_at_ms, finished_at_ms, outcome, error \
                     FROM task_runs WHERE task_id = $1 ORDER BY attempt",
                )
                .bind(id.to_string())
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(attempt_from_row).collect()
            }

            async fn list_tasks(&self, filter: &TaskFilter) -> StoreResult<Vec<TaskRecord>> {
                // Empty strings stand for "any", so one statement serves every filter.
                let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {TASK_COLUMNS} FROM tasks \
                     WHERE ($1 = '' OR queue = $1) AND ($2 = '' OR state = $2) \
                       AND ($3 = '' OR id < $3) \
                     ORDER BY id DESC LIMIT $4"
                )))
                .bind(filter.queue.clone().unwrap_or_default())
                .bind(filter.state.map(TaskState::as_str).unwrap_or_default())
                .bind(filter.before.map(|id| id.to_string()).unwrap_or_default())
                .bind(i64::from(filter.limit))
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(task_from_row).collect()
            }

            async fn apply(&self, writes: &[StatusWrite]) -> StoreResult<()> {
                // Every batch locks rows in task-id order, so two replicas'
                // batches never deadlock; the stable sort keeps one task's
                // writes in the order they came.
                let mut ordered: Vec<&StatusWrite> = writes.iter().collect();
                ordered.sort_by_key(|w| w.task_id());
                let mut tx = self.pool.begin().await?;
                for write in ordered {
                    match write {
                        StatusWrite::Dispatched { id, at } => {
                            Self::set_state(&mut tx, *id, TaskState::Dispatched, 0, None, *at).await?;
                        }
                        StatusWrite::Started { id, attempt, worker_id, at } => {
                            Self::set_state(&mut tx, *id, TaskState::Running, *attempt, None, *at).await?;
                            sqlx::query(
                                "INSERT INTO task_runs (task_id, attempt, worker_id, started_at_ms) \
                                 VALUES ($1, $2, $3, $4) ON CONFLICT (task_id, attempt) DO NOTHING",
                            )
                            .bind(id.to_string())
                            .bind(i64::from(*attempt))
                            .bind(worker_id.clone())
                            .bind(at.timestamp_millis())
                            .execute(&mut *tx)
                            .await?;
                        }
                        StatusWrite::Finished { id, attempt, worker_id, state, error, at } => {
                            Self::set_state(&mut tx, *id, *state, *attempt, error.as_deref(), *at).await?;
                            let outcome = match state {
                                TaskState::Succeeded => AttemptOutcome::Succeeded,
                                TaskState::Retrying => AttemptOutcome::Failed,
                                _ => AttemptOutcome::Terminal,
                            };
                            sqlx::query(
                                "INSERT INTO task_runs (task_id, attempt, worker_id, started_at_ms, \
                                 finished_at_ms, outcome, error) VALUES ($1, $2, $3, $4, $4, $5, $6) \
                                 ON CONFLICT (task_id, attempt) DO UPDATE SET \
                                 finished_at_ms = excluded.finished_at_ms, outcome = excluded.outcome, \
                                 error = excluded.error",
                            )
                            .bind(id.to_string())
                            .bind(i64::from(*attempt))
                            .bind(worker_id.clone())
                            .bind(at.timestamp_millis())
                            .bind(outcome.as_str())
                            .bind(error.clone())
                            .execute(&mut *tx)
                            .await?;
                        }
                        StatusWrite::Closed { id, state, at } => {
                            Self::set_state(&mut tx, *id, *state, 0, None, *at).await?;
                        }
                    }
                }
                tx.commit().await?;
                Ok(())
            }
        }
    };
}

impl_task_store!(SqliteStore, Sqlite);
impl_task_store!(PgStore, Postgres);

//! One SQL implementation, generated for SQLite and for Postgres by a macro:
//! the statements are portable (`$n` parameters, `ON CONFLICT`, `excluded`),
//! so both backends run the very same text and pass the same conformance tests.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Pool, Postgres, Row, Sqlite};

use super::{
    DynStore, InsertOutcome, StoreError, StoreResult, TaskFilter, TaskStore, id_from_text,
    ms_to_time,
};
use crate::domain::{
    AttemptOutcome, AttemptRecord, EventFilter, NewTask, Occurrence, StatusWrite, TaskEvent,
    TaskId, TaskRecord, TaskState, version_of,
};

/// Migrations of the SQLite backend.
pub static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");
/// Migrations of the Postgres backend.
pub static PG_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

/// The SQLite store (the default: one file, WAL, synchronous=FULL).
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pub(super) pool: Pool<Sqlite>,
    /// The one connection that writes. SQLite has one writer at a time
    /// anyway; with one connection its page cache stays warm (a connection
    /// drops its cache whenever another one has written), and writers queue
    /// in the pool instead of polling SQLite's busy lock.
    writer: Pool<Sqlite>,
}

/// The Postgres store (for several replicas).
#[derive(Debug, Clone)]
pub struct PgStore {
    pub(super) pool: Pool<Postgres>,
}

impl SqliteStore {
    /// The pool that writes: one connection.
    pub(super) fn writer(&self) -> &Pool<Sqlite> {
        &self.writer
    }
}

impl PgStore {
    /// The pool that writes: the same as for reads.
    pub(super) fn writer(&self) -> &Pool<Postgres> {
        &self.pool
    }
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
            // What a statement journal and a sort need stays in memory, not
            // in temporary files (the upsert of run rows still needs one).
            .pragma("temp_store", "memory")
            .busy_timeout(Duration::from_secs(10));
        if let Some(parent) = options.get_filename().parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(sqlx::Error::Io)?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await?;
        SQLITE_MIGRATOR.run(&pool).await?;
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        Ok(Arc::new(SqliteStore { pool, writer }))
    }
}

const TASK_COLUMNS: &str = "id, queue, state, due_at_ms, bucket_ms, expire_at_ms, max_attempts, \
     attempts, idempotency_key, content_type, payload_size, last_error, created_at_ms, updated_at_ms, \
     schedule_id, fire_at_ms";

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
    let schedule_id: Option<String> = row.try_get("schedule_id")?;
    let fire_at_ms: Option<i64> = row.try_get("fire_at_ms")?;
    let occurrence = match (schedule_id, fire_at_ms) {
        (Some(schedule), Some(ms)) => Some(Occurrence {
            schedule_id: TaskId::from_str(&schedule)
                .map_err(|e| corrupt(format!("bad schedule id `{schedule}`: {e}")))?,
            fire_at: ms_to_time("tasks", ms)?,
        }),
        _ => None,
    };
    Ok(TaskRecord {
        id: id_from_text("tasks", &id)?,
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
        occurrence,
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
        detail: row.try_get("detail")?,
    })
}

/// Most rows per multi-row statement: a whole ScheduleBatch, 18,000
/// parameters at most, under both backends' limits (SQLite 32,766, Postgres 65,535).
const CHUNK: usize = 1000;

/// Splits `items` into runs of [`CHUNK`], then of power-of-two lengths,
/// largest first. Each length is one statement text, so the connection's
/// statement cache keeps a handful of shapes per statement; with any length
/// allowed, nearly every batch had to be parsed and planned anew (statement
/// preparation was a tenth of the server's CPU in a burst). A full batch is
/// one statement: each statement is a round trip to the SQLite thread.
fn shaped_chunks<T>(mut items: &[T]) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        if items.is_empty() {
            return None;
        }
        let len = if items.len() >= CHUNK {
            CHUNK
        } else {
            1 << items.len().ilog2()
        };
        let (chunk, rest) = items.split_at(len);
        items = rest;
        Some(chunk)
    })
}

/// How a backend spells the placeholder of parameter `n` (from 1) in a
/// multi-row statement. SQLite gets anonymous `?`: sqlx resolves each named
/// parameter (`$n`) by name, a linear search per parameter in SQLite, which
/// made a 5,000-parameter statement quadratic (seen in a profile at 20 % CPU).
/// It appends to the statement text: a thousand-row statement has thousands
/// of placeholders, and a `String` for each showed in the server's profile.
type Placeholder = fn(&mut String, usize);

fn question_mark(text: &mut String, _: usize) {
    text.push('?');
}

fn dollar(text: &mut String, n: usize) {
    use std::fmt::Write as _;
    let _ = write!(text, "${n}");
}

/// Returns placeholder `n` on its own, for statements built clause by clause.
fn placeholder_text(placeholder: Placeholder, n: usize) -> String {
    let mut text = String::new();
    placeholder(&mut text, n);
    text
}

/// Returns `n` rows of `cols` placeholders each: `($1, $2), ($3, $4)` or `(?, ?), (?, ?)`.
fn rows(n: usize, cols: usize, placeholder: Placeholder) -> String {
    shaped_rows(n, &vec![None; cols], placeholder)
}

/// Like [`rows`], but a column given as `Some(literal)` is written into
/// every row instead of bound: a booking's constant columns (its state,
/// version, attempts) then cost no binding, which with a thousand rows per
/// statement is thousands of values fewer to copy.
fn shaped_rows(n: usize, shape: &[Option<&str>], placeholder: Placeholder) -> String {
    let bound = bound_columns(shape);
    let mut text = String::with_capacity(n * shape.len() * 4);
    for r in 0..n {
        text.push_str(if r == 0 { "(" } else { ", (" });
        let mut b = 0;
        for (c, column) in shape.iter().enumerate() {
            if c > 0 {
                text.push_str(", ");
            }
            match column {
                Some(literal) => text.push_str(literal),
                None => {
                    b += 1;
                    placeholder(&mut text, r * bound + b);
                }
            }
        }
        text.push(')');
    }
    text
}

/// How many values each row of `shape` binds.
fn bound_columns(shape: &[Option<&str>]) -> usize {
    shape.iter().filter(|c| c.is_none()).count()
}

/// The columns of a booked task's SCHEDULED event, in insert order: task id,
/// schedule id, queue and time are bound; attempt 0, the state, no worker
/// and no error are the same for every booking.
fn booked_event_shape(scheduled: &str) -> [Option<&str>; 8] {
    [
        None,
        None,
        None,
        Some("0"),
        Some(scheduled),
        None,
        Some("''"),
        Some("NULL"),
    ]
}

/// The columns of a booked task's row, in insert order: its state, version,
/// attempts and error are the same for every booking, so written as literals.
fn booked_task_shape(scheduled: &str) -> [Option<&str>; 18] {
    [
        None,            // id
        None,            // queue
        Some(scheduled), // state
        Some("0"),       // version
        None,            // due_at_ms
        None,            // bucket_ms
        None,            // expire_at_ms
        None,            // max_attempts
        Some("0"),       // attempts
        None,            // idempotency_key
        None,            // content_hash
        None,            // content_type
        None,            // payload_size
        Some("NULL"),    // last_error
        None,            // created_at_ms
        None,            // updated_at_ms
        None,            // schedule_id
        None,            // fire_at_ms
    ]
}

/// Returns the statement that reads `columns` of `n` tasks by id, in id
/// order, followed by `suffix`: on Postgres ` FOR UPDATE`, which locks them
/// in that order, so two transactions never wait for each other's rows.
fn tasks_by_id(columns: &str, n: usize, placeholder: Placeholder, suffix: &str) -> String {
    format!(
        "SELECT {columns} FROM tasks WHERE id IN ({}) ORDER BY id{suffix}",
        rows(n, 1, placeholder)
    )
}

/// Starts a statement with room for its `binds` values: a thousand-row
/// statement's argument list, grown by doubling, was copied and page-faulted
/// afresh at every step (a profile of a burst's booking; BENCHMARKS item 29).
fn sized<DB>(sql: String, binds: usize) -> sqlx::query::Query<'static, DB, DB::Arguments>
where
    DB: sqlx::Database,
    DB::Arguments: sqlx::IntoArguments<DB>,
{
    let mut args = DB::Arguments::default();
    sqlx::Arguments::reserve(&mut args, binds, binds * 16);
    sqlx::query_with(sqlx::AssertSqlSafe(sql), args)
}

/// The net effect of a batch on one task row.
#[derive(Debug, Clone, PartialEq)]
struct TaskUpdate {
    id: TaskId,
    state: TaskState,
    version: i64,
    at_ms: i64,
    attempts: i64,
    error: Option<String>,
    /// Version of the write `error` came from.
    error_version: i64,
}

/// One state change to append to the event log, if the task has not moved
/// past it already.
#[derive(Debug, Clone, PartialEq)]
struct EventRow {
    task_id: TaskId,
    version: i64,
    state: TaskState,
    /// 0 when the change is not about one attempt (the task's count is used).
    attempt: i64,
    at_ms: i64,
    worker_id: String,
    error: Option<String>,
    /// When the task was released, if its DISPATCHED is folded into this row.
    released_at_ms: Option<i64>,
    /// Version and time of the attempt's start, if its RUNNING is folded in.
    run: Option<(i64, i64)>,
}

impl EventRow {
    /// Tells whether `self` can be folded into `later`, the task's next
    /// change in the batch: a release into the first start, a start into
    /// the same worker's result of that attempt.
    fn folds_into(&self, later: &EventRow) -> bool {
        // A release folds into a start, a start (with its release) into a
        // result, and a result into nothing: `self` never carries a folded
        // start, and a release carries nothing.
        if self.task_id != later.task_id {
            return false;
        }
        match self.state {
            TaskState::Dispatched => later.state == TaskState::Running && later.attempt == 1,
            TaskState::Running => {
                later.attempt == self.attempt
                    && later.worker_id == self.worker_id
                    && matches!(
                        later.state,
                        TaskState::Succeeded | TaskState::Retrying | TaskState::Dead
                    )
            }
            _ => false,
        }
    }

    /// The folded release and start times still to log for a task whose
    /// stored version is `stored`: a part it has moved past was logged already.
    fn parts_after(&self, stored: i64) -> (Option<i64>, Option<i64>) {
        (
            self.released_at_ms
                .filter(|_| stored < version_of(TaskState::Dispatched, 0)),
            self.run
                .filter(|(version, _)| stored < *version)
                .map(|(_, at)| at),
        )
    }
}

/// Folds each task's consecutive changes into as few event rows as the
/// readers can unfold (see `EventRow::folds_into`); `events` is in task and
/// version order. A burst's task otherwise writes three rows for one job.
fn fold(events: Vec<EventRow>) -> Vec<EventRow> {
    let mut rows: Vec<EventRow> = Vec::with_capacity(events.len());
    for event in events {
        match rows.last_mut() {
            Some(last) if last.folds_into(&event) => {
                let earlier = std::mem::replace(last, event);
                if earlier.state == TaskState::Dispatched {
                    last.released_at_ms = Some(earlier.at_ms);
                } else {
                    last.released_at_ms = earlier.released_at_ms;
                    last.run = Some((earlier.version, earlier.at_ms));
                }
            }
            _ => rows.push(event),
        }
    }
    rows
}

/// What a status batch reads of a task before it logs the task's events.
struct StoredTask {
    version: i64,
    attempts: i64,
    schedule_id: Option<String>,
    queue: Arc<str>,
}

/// The text parameters of one batch of statements, each allocated once.
///
/// sqlx 0.9 copies every bound `&str` or `String` into a new `Arc` (two
/// allocations, freed later on the SQLite thread), while an `Arc<str>` is bound
/// by its reference count. A batch binds the same few texts (states, queues,
/// worker ids, the fingerprint, empty without an idempotency key) and each
/// task's id several times. Its sets, like the batch plan's, use foldhash:
/// std's SipHash showed in a burst's profile, once per bound value.
#[derive(Default)]
struct Texts {
    words: foldhash::HashSet<Arc<str>>,
    ids: foldhash::HashMap<TaskId, Arc<str>>,
}

impl Texts {
    /// A text that recurs across rows (a state, a queue, a worker id).
    fn word(&mut self, text: &str) -> Arc<str> {
        if let Some(shared) = self.words.get(text) {
            return shared.clone();
        }
        let shared: Arc<str> = Arc::from(text);
        self.words.insert(shared.clone());
        shared
    }

    /// A task id, as stored.
    fn id(&mut self, id: TaskId) -> Arc<str> {
        self.ids
            .entry(id)
            .or_insert_with(|| Arc::from(id.to_string()))
            .clone()
    }
}

/// The net effect of a batch on one run-log row.
#[derive(Debug, Clone, PartialEq)]
struct RunRow {
    task_id: TaskId,
    attempt: i64,
    worker_id: String,
    started_at_ms: i64,
    /// Finish time, outcome, error and detail, once the attempt ended.
    finished: Option<(i64, AttemptOutcome, Option<String>, Option<String>)>,
}

/// Collapses a batch of status writes into one update per task and one row
/// per attempt, so a whole batch costs a few statements, not one per write.
/// Within a task the write with the highest version wins, as it would if the
/// writes were applied one by one with the version guard.
fn plan(writes: &[StatusWrite]) -> (Vec<TaskUpdate>, Vec<RunRow>, Vec<EventRow>) {
    let mut tasks: Vec<TaskUpdate> = Vec::new();
    let mut events: Vec<EventRow> = Vec::with_capacity(writes.len());
    let mut task_index: foldhash::HashMap<TaskId, usize> = foldhash::HashMap::default();
    let mut runs: Vec<RunRow> = Vec::new();
    let mut run_index: foldhash::HashMap<(TaskId, i64), usize> = foldhash::HashMap::default();
    for write in writes {
        let (id, state, attempt, error, at) = match write {
            StatusWrite::Dispatched { id, at } => (*id, TaskState::Dispatched, 0, None, *at),
            StatusWrite::Started {
                id, attempt, at, ..
            } => (*id, TaskState::Running, *attempt, None, *at),
            StatusWrite::Finished {
                id,
                attempt,
                state,
                error,
                at,
                ..
            } => (*id, *state, *attempt, error.clone(), *at),
            StatusWrite::Closed { id, state, at } => (*id, *state, 0, None, *at),
        };
        let version = version_of(state, attempt);
        let worker = match write {
            StatusWrite::Started { worker_id, .. } | StatusWrite::Finished { worker_id, .. } => {
                worker_id.as_str()
            }
            _ => "",
        };
        let event = |state, version, attempt: u32| EventRow {
            task_id: id,
            version,
            state,
            attempt: i64::from(attempt),
            at_ms: at.timestamp_millis(),
            worker_id: worker.to_owned(),
            error: error.clone(),
            released_at_ms: None,
            run: None,
        };
        if state == TaskState::Running && attempt == 1 {
            // A first start implies the release: the dispatcher's own write is
            // informational and may arrive later, when it no longer counts.
            let mut dispatched = event(
                TaskState::Dispatched,
                version_of(TaskState::Dispatched, 0),
                0,
            );
            dispatched.worker_id.clear();
            events.push(dispatched);
        }
        events.push(event(state, version, attempt));
        let update = TaskUpdate {
            id,
            state,
            version,
            at_ms: at.timestamp_millis(),
            attempts: i64::from(attempt),
            error_version: if error.is_some() { version } else { i64::MIN },
            error,
        };
        match task_index.get(&id) {
            None => {
                task_index.insert(id, tasks.len());
                tasks.push(update);
            }
            Some(&i) => {
                let current = &mut tasks[i];
                current.attempts = current.attempts.max(update.attempts);
                if update.error.is_some() && update.error_version >= current.error_version {
                    current.error = update.error.clone();
                    current.error_version = update.error_version;
                }
                if update.version > current.version {
                    current.state = update.state;
                    current.version = update.version;
                    current.at_ms = update.at_ms;
                }
            }
        }
        let (attempt, worker_id, finished) = match write {
            StatusWrite::Started {
                attempt, worker_id, ..
            } => (*attempt, worker_id, None),
            StatusWrite::Finished {
                attempt,
                worker_id,
                state,
                error,
                detail,
                at,
                ..
            } => {
                let outcome = match state {
                    TaskState::Succeeded => AttemptOutcome::Succeeded,
                    TaskState::Retrying => AttemptOutcome::Failed,
                    _ => AttemptOutcome::Terminal,
                };
                (
                    *attempt,
                    worker_id,
                    Some((
                        at.timestamp_millis(),
                        outcome,
                        error.clone(),
                        detail.clone(),
                    )),
                )
            }
            _ => continue,
        };
        let key = (id, i64::from(attempt));
        match run_index.get(&key) {
            None => {
                run_index.insert(key, runs.len());
                runs.push(RunRow {
                    task_id: id,
                    attempt: key.1,
                    worker_id: worker_id.clone(),
                    started_at_ms: at.timestamp_millis(),
                    finished,
                });
            }
            Some(&i) => {
                if finished.is_some() {
                    runs[i].finished = finished;
                    runs[i].worker_id = worker_id.clone();
                }
            }
        }
    }
    // Every batch locks rows in task-id order, so two replicas' batches never
    // deadlock. The keys are unique here, so an unstable sort (no scratch
    // buffer) gives the same order.
    tasks.sort_unstable_by_key(|t| t.id);
    runs.sort_unstable_by_key(|r| (r.task_id, r.attempt));
    // Per task in version order, one event per version: the order a
    // subscriber sees them in, and no duplicate from a report sent twice.
    // Of two writes for one version the earlier wins: a dispatcher's own
    // DISPATCHED over the one a first start implies.
    events.sort_by_key(|e| (e.task_id, e.version, e.at_ms));
    events.dedup_by_key(|e| (e.task_id, e.version));
    (tasks, runs, fold(events))
}

/// Statement that serializes event-log appends on Postgres, taken just
/// before a transaction appends events and held to its commit: ids then
/// commit in id order, so a reader never sees id N+1 before id N. A
/// transaction takes it only after the task rows it changes are locked and
/// never waits for a row while holding it, so it cannot deadlock with them;
/// the row locks are what make the version guard read committed states.
/// SQLite needs none: it has one writer at a time.
const PG_EVENT_LOCK: &str = "SELECT pg_advisory_xact_lock(7411000)";

/// Columns of an event row read back.
const EVENT_COLUMNS: &str = "id, task_id, schedule_id, queue, attempt, state, at_ms, worker_id, error, \
     released_at_ms, run_at_ms";

/// Cursors per event row: a row unfolds into up to three events (a folded
/// release, a folded start, its own change), which take cursors
/// `4 * id - 2`, `4 * id - 1` and `4 * id`, so cursors keep increasing.
const CURSORS_PER_ROW: i64 = 4;

/// The cursor of a row's own change, the last of its events.
fn row_cursor(id: i64) -> i64 {
    id.saturating_mul(CURSORS_PER_ROW)
}

/// The last row every event of which is at or before `cursor`.
fn row_of(cursor: i64) -> i64 {
    cursor.div_euclid(CURSORS_PER_ROW)
}

/// Unfolds one event row into its events, oldest first, onto `events`.
fn events_from_row<R: Row>(row: &R, events: &mut Vec<TaskEvent>) -> StoreResult<()>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let corrupt = |reason: String| StoreError::Corrupt {
        table: "task_events",
        reason,
    };
    let id = |text: String| id_from_text("task_events", &text);
    let state: String = row.try_get("state")?;
    let schedule_id: Option<String> = row.try_get("schedule_id")?;
    let cursor = row_cursor(row.try_get("id")?);
    let own = TaskEvent {
        cursor,
        task_id: id(row.try_get("task_id")?)?,
        schedule_id: schedule_id.map(id).transpose()?,
        queue: row.try_get("queue")?,
        attempt: u32::try_from(row.try_get::<i64, _>("attempt")?).unwrap_or(u32::MAX),
        state: TaskState::parse(&state).ok_or_else(|| corrupt(format!("bad state `{state}`")))?,
        at: ms_to_time("task_events", row.try_get("at_ms")?)?,
        worker_id: row.try_get("worker_id")?,
        error: row.try_get("error")?,
    };
    let released_at_ms: Option<i64> = row.try_get("released_at_ms")?;
    let run_at_ms: Option<i64> = row.try_get("run_at_ms")?;
    if let Some(ms) = released_at_ms {
        events.push(TaskEvent {
            cursor: cursor - 2,
            attempt: 0,
            state: TaskState::Dispatched,
            at: ms_to_time("task_events", ms)?,
            worker_id: String::new(),
            error: None,
            ..own.clone()
        });
    }
    if let Some(ms) = run_at_ms {
        events.push(TaskEvent {
            cursor: cursor - 1,
            state: TaskState::Running,
            at: ms_to_time("task_events", ms)?,
            error: None,
            ..own.clone()
        });
    }
    events.push(own);
    Ok(())
}

/// Returns the WHERE clause of an event read, numbering parameters from 3
/// (1 and 2 are the cursor bounds; the limit comes last), and the values to
/// bind, in the order they appear (SQLite's `?` are bound by position).
fn event_condition(filter: &EventFilter, placeholder: Placeholder) -> (String, Vec<String>) {
    let mut clause = String::new();
    let mut binds = Vec::new();
    let next = |value: String, binds: &mut Vec<String>| {
        binds.push(value);
        placeholder_text(placeholder, binds.len() + 2)
    };
    // `column IN (values)`, or'ed with `more` (columns that also match).
    let mut any_of = |column: &str, values: Vec<String>, more: &str, binds: &mut Vec<String>| {
        if !values.is_empty() {
            let list: Vec<String> = values.into_iter().map(|v| next(v, binds)).collect();
            clause.push_str(&format!(" AND ({column} IN ({}){more})", list.join(", ")));
        }
    };
    any_of(
        "task_id",
        filter.task_ids.iter().map(ToString::to_string).collect(),
        "",
        &mut binds,
    );
    any_of(
        "schedule_id",
        filter.schedule_id.iter().map(ToString::to_string).collect(),
        "",
        &mut binds,
    );
    any_of(
        "queue",
        filter.queue.iter().cloned().collect(),
        "",
        &mut binds,
    );
    // A row matches by its own state or by a change folded into it.
    let mut folded = String::new();
    if filter.states.contains(&TaskState::Dispatched) {
        folded.push_str(" OR released_at_ms IS NOT NULL");
    }
    if filter.states.contains(&TaskState::Running) {
        folded.push_str(" OR run_at_ms IS NOT NULL");
    }
    any_of(
        "state",
        filter
            .states
            .iter()
            .map(|s| s.as_str().to_owned())
            .collect(),
        &folded,
        &mut binds,
    );
    (clause, binds)
}

/// States few tasks stay in, which `tasks_rare_state_id` indexes: the
/// condition is its WHERE clause word for word, because SQLite uses a partial
/// index only for a query that repeats it.
const RARE_STATES: &str = "state IN ('retrying', 'dead', 'cancelled', 'expired', 'skipped')";

/// ListTasks as a statement with only the conditions the filter has, so the
/// planner can pick the index that serves them (a catch-all `$1 = '' OR …`
/// statement read the whole table backwards); its text values in order, the
/// limit to be bound last.
fn list_query(filter: &TaskFilter, placeholder: Placeholder) -> (String, Vec<String>) {
    let mut conditions = Vec::new();
    let mut values = Vec::new();
    let mut add = |condition: &str, value: String| {
        values.push(value);
        conditions.push(format!(
            "{condition} {}",
            placeholder_text(placeholder, values.len())
        ));
    };
    if let Some(queue) = &filter.queue {
        add("queue =", queue.clone());
    }
    if let Some(state) = filter.state {
        add("state =", state.as_str().to_owned());
    }
    if let Some(before) = filter.before {
        add("id <", before.to_string());
    }
    if let Some(schedule) = filter.schedule {
        add("schedule_id =", schedule.to_string());
    }
    let rare = |state: TaskState| RARE_STATES.contains(&format!("'{}'", state.as_str()));
    if filter.queue.is_none() && filter.state.is_some_and(rare) {
        conditions.push(RARE_STATES.to_owned());
    }
    let mut sql = format!("SELECT {TASK_COLUMNS} FROM tasks");
    if !conditions.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&conditions.join(" AND "));
    }
    sql.push_str(&format!(
        " ORDER BY id DESC LIMIT {}",
        placeholder_text(placeholder, values.len() + 1)
    ));
    (sql, values)
}

macro_rules! impl_task_store {
    (
        $store:ty,
        $placeholder:expr,
        $serialize:expr,
        $lock_rows:expr,
        $batches_at_once:expr,
        $or_fail:expr
    ) => {
        impl $store {
            /// The last event row pruned (0 before any).
            async fn pruned_rows(&self) -> StoreResult<i64> {
                let row = sqlx::query("SELECT pruned_through FROM event_horizon WHERE id = 1")
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(row.map(|r| r.try_get("pruned_through")).transpose()?.unwrap_or(0))
            }
        }

        #[tonic::async_trait]
        impl TaskStore for $store {
            async fn insert_tasks(
                &self,
                tasks: &[NewTask],
                bucket_ms: &[i64],
            ) -> StoreResult<Vec<InsertOutcome>> {
                let or_fail: &str = $or_fail;
                let mut tx = self.writer().begin().await?;
                let mut inserted: foldhash::HashSet<TaskId> =
                    foldhash::HashSet::with_capacity_and_hasher(tasks.len(), Default::default());
                let items: Vec<(&NewTask, &i64)> = tasks.iter().zip(bucket_ms).collect();
                let mut texts = Texts::default();
                let scheduled = format!("'{}'", TaskState::Scheduled.as_str());
                let task_shape = booked_task_shape(&scheduled);
                let event_shape = booked_event_shape(&scheduled);
                for chunk in shaped_chunks(&items) {
                    // Only an idempotency key can conflict (ids are fresh UUIDv7s).
                    // Without one, every row goes in, and not reading 1,000 ids
                    // back row by row made a batch's insert cheaper.
                    let keyed = chunk.iter().any(|(t, _)| t.idempotency_key.is_some());
                    let sql = format!(
                        "INSERT{or_fail} INTO tasks (id, queue, state, version, due_at_ms, bucket_ms, \
                         expire_at_ms, max_attempts, attempts, idempotency_key, content_hash, \
                         content_type, payload_size, last_error, created_at_ms, updated_at_ms, \
                         schedule_id, fire_at_ms) VALUES {}{}",
                        shaped_rows(chunk.len(), &task_shape, $placeholder),
                        if keyed {
                            " ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL \
                             DO NOTHING RETURNING id"
                        } else {
                            ""
                        }
                    );
                    let mut query = sized(sql, chunk.len() * bound_columns(&task_shape));
                    for (task, bucket) in chunk {
                        let created = task.created_at.timestamp_millis();
                        query = query
                            .bind(texts.id(task.id))
                            .bind(texts.word(&task.queue))
                            .bind(task.due_at.timestamp_millis())
                            .bind(**bucket)
                            .bind(task.expire_at.map(|t| t.timestamp_millis()))
                            .bind(i64::from(task.max_attempts))
                            .bind(task.idempotency_key.clone())
                            .bind(texts.word(&task.content_hash))
                            .bind(texts.word(&task.content_type))
                            .bind(task.payload.len() as i64)
                            .bind(created)
                            .bind(created)
                            .bind(task.occurrence.map(|o| o.schedule_id.to_string()))
                            .bind(task.occurrence.map(|o| o.fire_at.timestamp_millis()));
                    }
                    if keyed {
                        for row in query.fetch_all(&mut *tx).await? {
                            let id: String = row.try_get("id")?;
                            inserted.insert(id_from_text("tasks", &id)?);
                        }
                    } else {
                        query.execute(&mut *tx).await?;
                        inserted.extend(chunk.iter().map(|(t, _)| t.id));
                    }
                }
                if !inserted.is_empty() {
                    if let Some(lock) = $serialize {
                        sqlx::query(lock).execute(&mut *tx).await?;
                    }
                    let fresh: Vec<&NewTask> = tasks
                        .iter()
                        .filter(|t| inserted.contains(&t.id))
                        .collect();
                    for chunk in shaped_chunks(&fresh) {
                        let sql = format!(
                            "INSERT{or_fail} INTO task_events (task_id, schedule_id, queue, \
                             attempt, state, at_ms, worker_id, error) VALUES {}",
                            shaped_rows(chunk.len(), &event_shape, $placeholder)
                        );
                        let mut query = sized(sql, chunk.len() * bound_columns(&event_shape));
                        for task in chunk {
                            query = query
                                .bind(texts.id(task.id))
                                .bind(task.occurrence.map(|o| o.schedule_id.to_string()))
                                .bind(texts.word(&task.queue))
                                .bind(task.created_at.timestamp_millis());
                        }
                        query.execute(&mut *tx).await?;
                    }
                }
                let mut outcomes = Vec::with_capacity(tasks.len());
                for task in tasks {
                    if inserted.contains(&task.id) {
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
                let mut tx = self.writer().begin().await?;
                let mut ids = ids.to_vec();
                ids.sort_unstable();
                // Rows first, then the log's lock (see PG_EVENT_LOCK).
                for chunk in shaped_chunks(&ids) {
                    let sql = tasks_by_id("id", chunk.len(), $placeholder, $lock_rows);
                    let mut query = sized(sql, chunk.len());
                    for id in chunk {
                        query = query.bind(id.to_string());
                    }
                    query.fetch_all(&mut *tx).await?;
                }
                if let Some(lock) = $serialize {
                    sqlx::query(lock).execute(&mut *tx).await?;
                }
                let now_ms = chrono::Utc::now().timestamp_millis();
                for id in ids {
                    // Subscribers may have seen it SCHEDULED: the log says it ended.
                    sqlx::query(
                        "INSERT INTO task_events (task_id, schedule_id, queue, attempt, state, \
                         at_ms, worker_id, error) SELECT id, schedule_id, queue, attempts, $2, $3, '', \
                         'not booked: the task could not be stored' FROM tasks WHERE id = $1",
                    )
                    .bind(id.to_string())
                    .bind(TaskState::Cancelled.as_str())
                    .bind(now_ms)
                    .execute(&mut *tx)
                    .await?;
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
                    "SELECT attempt, worker_id, started_at_ms, finished_at_ms, outcome, error, \
                     detail FROM task_runs WHERE task_id = $1 ORDER BY attempt",
                )
                .bind(id.to_string())
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(attempt_from_row).collect()
            }

            async fn list_tasks(&self, filter: &TaskFilter) -> StoreResult<Vec<TaskRecord>> {
                let (sql, values) = list_query(filter, $placeholder);
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
                for value in values {
                    query = query.bind(value);
                }
                let rows = query
                    .bind(i64::from(filter.limit))
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(task_from_row).collect()
            }

            async fn revive_task(
                &self,
                id: TaskId,
                max_attempts: u32,
                at: chrono::DateTime<chrono::Utc>,
            ) -> StoreResult<bool> {
                let mut tx = self.writer().begin().await?;
                // Version 1 (dispatched): the next attempt's RUNNING moves it on.
                let revived = sqlx::query(
                    "UPDATE tasks SET state = $1, version = $2, max_attempts = $3, \
                     updated_at_ms = $4 WHERE id = $5 AND state = $6",
                )
                .bind(TaskState::Dispatched.as_str())
                .bind(version_of(TaskState::Dispatched, 0))
                .bind(i64::from(max_attempts))
                .bind(at.timestamp_millis())
                .bind(id.to_string())
                .bind(TaskState::Dead.as_str())
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    == 1;
                if revived {
                    // After the update has locked the row (see PG_EVENT_LOCK).
                    if let Some(lock) = $serialize {
                        sqlx::query(lock).execute(&mut *tx).await?;
                    }
                    sqlx::query(
                        "INSERT INTO task_events (task_id, schedule_id, queue, attempt, state, \
                         at_ms, worker_id, error) SELECT id, schedule_id, queue, attempts, $2, $3, '', \
                         NULL FROM tasks WHERE id = $1",
                    )
                    .bind(id.to_string())
                    .bind(TaskState::Dispatched.as_str())
                    .bind(at.timestamp_millis())
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(revived)
            }

            async fn read_events(
                &self,
                after: i64,
                upto: i64,
                filter: &EventFilter,
                limit: u32,
            ) -> StoreResult<Vec<TaskEvent>> {
                let (condition, binds) = event_condition(filter, $placeholder);
                let sql = format!(
                    "SELECT {EVENT_COLUMNS} FROM task_events WHERE id > {} AND id <= {}{condition} \
                     ORDER BY id LIMIT {}",
                    placeholder_text($placeholder, 1),
                    placeholder_text($placeholder, 2),
                    placeholder_text($placeholder, binds.len() + 3),
                );
                // The rows holding an event in (after, upto]; the events of
                // the first and last row outside it are dropped below.
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(row_of(after))
                    .bind(row_of(upto).saturating_add(1));
                for value in binds {
                    query = query.bind(value);
                }
                // One row more than the page: the first row may hold only
                // events at or before `after`. Every other row read has an
                // event that passes (the condition checks folded changes
                // too) or lies past `upto`, after which nothing passes; so
                // fewer than `limit` events still means the end.
                query = query.bind(i64::from(limit).saturating_add(1));
                let rows = query.fetch_all(&self.pool).await?;
                let mut events = Vec::with_capacity(rows.len());
                for row in &rows {
                    events_from_row(row, &mut events)?;
                }
                events.retain(|e| e.cursor > after && e.cursor <= upto && filter.wants_state(e.state));
                events.truncate(limit as usize);
                Ok(events)
            }

            async fn last_event(&self) -> StoreResult<i64> {
                let row = sqlx::query(
                    "SELECT COALESCE((SELECT MAX(id) FROM task_events), \
                     (SELECT pruned_through FROM event_horizon WHERE id = 1), 0) AS last",
                )
                .fetch_one(&self.pool)
                .await?;
                Ok(row_cursor(row.try_get("last")?))
            }

            async fn pruned_through(&self) -> StoreResult<i64> {
                Ok(row_cursor(self.pruned_rows().await?))
            }

            async fn prune_events(&self, before_ms: i64, max: u32) -> StoreResult<u64> {
                let through = self.pruned_rows().await?;
                let rows = sqlx::query(
                    "SELECT id, at_ms FROM task_events WHERE id > $1 ORDER BY id LIMIT $2",
                )
                .bind(through)
                .bind(i64::from(max))
                .fetch_all(&self.pool)
                .await?;
                // Only a prefix goes, so the horizon is one cursor below which nothing is left.
                let mut last = None;
                for row in &rows {
                    if row.try_get::<i64, _>("at_ms")? >= before_ms {
                        break;
                    }
                    last = Some(row.try_get::<i64, _>("id")?);
                }
                let Some(last) = last else { return Ok(0) };
                let mut tx = self.writer().begin().await?;
                let deleted = sqlx::query("DELETE FROM task_events WHERE id > $1 AND id <= $2")
                    .bind(through)
                    .bind(last)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                sqlx::query(
                    "UPDATE event_horizon SET pruned_through = \
                     CASE WHEN pruned_through < $1 THEN $1 ELSE pruned_through END WHERE id = 1",
                )
                .bind(last)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(deleted)
            }

            fn batches_at_once(&self) -> usize {
                $batches_at_once
            }

            async fn apply_in_turn(
                &self,
                writes: &[StatusWrite],
                rows_held: Option<tokio::sync::oneshot::Sender<()>>,
            ) -> StoreResult<()> {
                let (tasks, runs, events) = plan(writes);
                let or_fail: &str = $or_fail;
                let mut texts = Texts::default();
                let mut tx = self.writer().begin().await?;
                let mut stored: foldhash::HashMap<TaskId, StoredTask> =
                    foldhash::HashMap::default();
                // An event is kept only if its version is past the stored
                // one, so the log of each task is in order and a change
                // reported twice is logged once.
                let mut logged: Vec<(&EventRow, &StoredTask)> = Vec::new();
                if $batches_at_once > 1 {
                    // Batches overlap: hold this one's task rows first, in id
                    // order (`tasks` is sorted), and read what each event is
                    // checked against; a batch begun later waits here for the
                    // tasks it shares. The events go last (see PG_EVENT_LOCK).
                    for chunk in shaped_chunks(&tasks) {
                        let sql = tasks_by_id(
                            "id, version, attempts, schedule_id, queue",
                            chunk.len(),
                            $placeholder,
                            $lock_rows,
                        );
                        let mut query = sized(sql, chunk.len());
                        for t in chunk {
                            query = query.bind(texts.id(t.id));
                        }
                        for row in query.fetch_all(&mut *tx).await? {
                            let id: String = row.try_get("id")?;
                            let queue: String = row.try_get("queue")?;
                            stored.insert(
                                id_from_text("tasks", &id)?,
                                StoredTask {
                                    version: row.try_get("version")?,
                                    attempts: row.try_get("attempts")?,
                                    schedule_id: row.try_get("schedule_id")?,
                                    queue: texts.word(&queue),
                                },
                            );
                        }
                    }
                    logged = events
                        .iter()
                        .filter_map(|e| {
                            let task = stored.get(&e.task_id)?;
                            (task.version < e.version).then_some((e, task))
                        })
                        .collect();
                } else {
                    // One writer: log the events before the tasks move, checked
                    // against the stored versions inside the statement, which
                    // costs less than reading the rows back.
                    if let Some(lock) = $serialize {
                        sqlx::query(lock).execute(&mut *tx).await?;
                    }
                    let dispatched = version_of(TaskState::Dispatched, 0);
                    for chunk in shaped_chunks(&events) {
                        let sql = format!(
                            "WITH v (n, task_id, version, state, attempt, at_ms, worker_id, error, \
                             released_at_ms, run_version, run_at_ms) AS (VALUES {}) \
                             INSERT{or_fail} INTO task_events (task_id, schedule_id, queue, attempt, state, at_ms, \
                             worker_id, error, released_at_ms, run_at_ms) \
                             SELECT v.task_id, t.schedule_id, t.queue, \
                             CASE WHEN v.attempt = 0 THEN t.attempts ELSE v.attempt END, \
                             v.state, v.at_ms, v.worker_id, v.error, \
                             CASE WHEN t.version < {dispatched} THEN v.released_at_ms END, \
                             CASE WHEN t.version < v.run_version THEN v.run_at_ms END \
                             FROM v JOIN tasks t ON t.id = v.task_id \
                             WHERE t.version < v.version ORDER BY v.n",
                            rows(chunk.len(), 11, $placeholder)
                        );
                        let mut query = sized(sql, chunk.len() * 11);
                        for (n, e) in chunk.iter().enumerate() {
                            query = query
                                .bind(n as i64)
                                .bind(texts.id(e.task_id))
                                .bind(e.version)
                                .bind(texts.word(e.state.as_str()))
                                .bind(e.attempt)
                                .bind(e.at_ms)
                                .bind(texts.word(&e.worker_id))
                                .bind(e.error.clone())
                                .bind(e.released_at_ms)
                                .bind(e.run.map(|(version, _)| version))
                                .bind(e.run.map(|(_, at)| at));
                        }
                        query.execute(&mut *tx).await?;
                    }
                }
                if let Some(held) = rows_held {
                    let _ = held.send(());
                }
                for chunk in shaped_chunks(&tasks) {
                    let sql = format!(
                        "WITH v (id, state, version, at_ms, attempts, error) AS (VALUES {}) \
                         UPDATE{or_fail} tasks SET state = v.state, version = v.version, updated_at_ms = v.at_ms, \
                         attempts = CASE WHEN tasks.attempts < v.attempts THEN v.attempts ELSE tasks.attempts END, \
                         last_error = COALESCE(v.error, tasks.last_error) \
                         FROM v WHERE tasks.id = v.id AND tasks.version < v.version",
                        rows(chunk.len(), 6, $placeholder)
                    );
                    let mut query = sized(sql, chunk.len() * 6);
                    for t in chunk {
                        query = query
                            .bind(texts.id(t.id))
                            .bind(texts.word(t.state.as_str()))
                            .bind(t.version)
                            .bind(t.at_ms)
                            .bind(t.attempts)
                            .bind(t.error.clone());
                    }
                    query.execute(&mut *tx).await?;
                }
                let (finished, started): (Vec<&RunRow>, Vec<&RunRow>) =
                    runs.iter().partition(|r| r.finished.is_some());
                for chunk in shaped_chunks(&started) {
                    let sql = format!(
                        "INSERT{or_fail} INTO task_runs (task_id, attempt, worker_id, started_at_ms) VALUES {} \
                         ON CONFLICT (task_id, attempt) DO NOTHING",
                        rows(chunk.len(), 4, $placeholder)
                    );
                    let mut query = sized(sql, chunk.len() * 4);
                    for r in chunk {
                        query = query
                            .bind(texts.id(r.task_id))
                            .bind(r.attempt)
                            .bind(texts.word(&r.worker_id))
                            .bind(r.started_at_ms);
                    }
                    query.execute(&mut *tx).await?;
                }
                for chunk in shaped_chunks(&finished) {
                    let sql = format!(
                        "INSERT{or_fail} INTO task_runs (task_id, attempt, worker_id, started_at_ms, \
                         finished_at_ms, outcome, error, detail) VALUES {} \
                         ON CONFLICT (task_id, attempt) DO UPDATE SET worker_id = excluded.worker_id, \
                         finished_at_ms = excluded.finished_at_ms, outcome = excluded.outcome, \
                         error = excluded.error, detail = excluded.detail",
                        rows(chunk.len(), 8, $placeholder)
                    );
                    let mut query = sized(sql, chunk.len() * 8);
                    for r in chunk {
                        let (finished_at_ms, outcome, error, detail) =
                            r.finished.clone().expect("partitioned");
                        query = query
                            .bind(texts.id(r.task_id))
                            .bind(r.attempt)
                            .bind(texts.word(&r.worker_id))
                            .bind(r.started_at_ms)
                            .bind(finished_at_ms)
                            .bind(texts.word(outcome.as_str()))
                            .bind(error)
                            .bind(detail);
                    }
                    query.execute(&mut *tx).await?;
                }
                // Last, so that the lock ordering the log covers only the
                // append and the commit.
                if !logged.is_empty() {
                    if let Some(lock) = $serialize {
                        sqlx::query(lock).execute(&mut *tx).await?;
                    }
                }
                for chunk in shaped_chunks(&logged) {
                    let sql = format!(
                        "INSERT{or_fail} INTO task_events (task_id, schedule_id, queue, attempt, state, at_ms, \
                         worker_id, error, released_at_ms, run_at_ms) VALUES {}",
                        rows(chunk.len(), 10, $placeholder)
                    );
                    let mut query = sized(sql, chunk.len() * 10);
                    for (e, task) in chunk {
                        let attempt = if e.attempt == 0 { task.attempts } else { e.attempt };
                        let (released_at_ms, run_at_ms) = e.parts_after(task.version);
                        query = query
                            .bind(texts.id(e.task_id))
                            .bind(task.schedule_id.clone())
                            .bind(task.queue.clone())
                            .bind(attempt)
                            .bind(texts.word(e.state.as_str()))
                            .bind(e.at_ms)
                            .bind(texts.word(&e.worker_id))
                            .bind(e.error.clone())
                            .bind(released_at_ms)
                            .bind(run_at_ms);
                    }
                    query.execute(&mut *tx).await?;
                }
                tx.commit().await?;
                Ok(())
            }
        }
    };
}

// SQLite's multi-row statements say `OR FAIL`: a statement that may abort
// half-way inside a transaction makes SQLite copy every page it changes to a
// statement journal first (a temporary file past 64 KiB; about 6 % of the
// writer thread in a burst's profile), so that it can undo just itself. A
// failed statement here fails its whole transaction, which is rolled back, so
// FAIL (keep what the statement did so far, and stop) ends the same way.
// Postgres has no such clause, nor the journal.
impl_task_store!(SqliteStore, question_mark, None::<&str>, "", 1, " OR FAIL");
impl_task_store!(PgStore, dollar, Some(PG_EVENT_LOCK), " FOR UPDATE", 2, "");

#[cfg(test)]
mod tests {
    use chrono::{Duration, Utc};

    use super::*;

    #[test]
    fn plan_collapses_a_batch_to_one_row_per_task_and_attempt() {
        let id = TaskId::new();
        let t0 = Utc::now();
        let writes = vec![
            StatusWrite::Started {
                id,
                attempt: 1,
                worker_id: "w1".into(),
                at: t0,
            },
            StatusWrite::Finished {
                id,
                attempt: 1,
                worker_id: "w1".into(),
                state: TaskState::Retrying,
                error: Some("boom".into()),
                detail: None,
                at: t0 + Duration::seconds(1),
            },
            StatusWrite::Dispatched { id, at: t0 },
            StatusWrite::Started {
                id,
                attempt: 2,
                worker_id: "w2".into(),
                at: t0 + Duration::seconds(2),
            },
        ];
        let (tasks, runs, _) = plan(&writes);
        assert_eq!(tasks.len(), 1);
        assert_eq!(tasks[0].state, TaskState::Running);
        assert_eq!(tasks[0].attempts, 2);
        assert_eq!(tasks[0].error.as_deref(), Some("boom"));
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].started_at_ms, t0.timestamp_millis());
        assert_eq!(
            runs[0].finished.as_ref().map(|f| f.1),
            Some(AttemptOutcome::Failed)
        );
        assert!(runs[1].finished.is_none());
    }

    #[test]
    fn plan_folds_a_release_and_a_start_into_the_same_workers_result_only() {
        let (id, other) = (TaskId::new(), TaskId::new());
        let t0 = Utc::now();
        let started = |id, worker: &str| StatusWrite::Started {
            id,
            attempt: 1,
            worker_id: worker.into(),
            at: t0,
        };
        let finished = |id, worker: &str| StatusWrite::Finished {
            id,
            attempt: 1,
            worker_id: worker.into(),
            state: TaskState::Succeeded,
            error: None,
            detail: None,
            at: t0 + Duration::seconds(1),
        };
        let (_, _, events) = plan(&[
            StatusWrite::Dispatched { id, at: t0 },
            started(id, "w"),
            finished(id, "w"),
            started(other, "w"),
            finished(other, "w2"),
        ]);
        let shapes: Vec<_> = events
            .iter()
            .map(|e| {
                (
                    e.task_id,
                    e.state,
                    e.released_at_ms.is_some(),
                    e.run.is_some(),
                )
            })
            .collect();
        let (first, second) = if id < other { (id, other) } else { (other, id) };
        let expected = |task| {
            if task == id {
                vec![(id, TaskState::Succeeded, true, true)]
            } else {
                // Another worker's result is not this start's: two rows.
                vec![
                    (other, TaskState::Running, true, false),
                    (other, TaskState::Succeeded, false, false),
                ]
            }
        };
        assert_eq!(shapes, [expected(first), expected(second)].concat());
    }

    #[test]
    fn plan_orders_rows_by_task_id() {
        let (a, b) = (TaskId::new(), TaskId::new());
        let at = Utc::now();
        let (tasks, _, _) = plan(&[
            StatusWrite::Dispatched { id: b, at },
            StatusWrite::Dispatched { id: a, at },
        ]);
        assert_eq!(tasks.iter().map(|t| t.id).collect::<Vec<_>>(), vec![a, b]);
    }

    #[test]
    fn placeholders_number_every_row() {
        assert_eq!(rows(2, 2, dollar), "($1, $2), ($3, $4)");
        assert_eq!(rows(2, 2, question_mark), "(?, ?), (?, ?)");
        assert_eq!(rows(1, 3, dollar), "($1, $2, $3)");
    }

    #[test]
    fn literal_columns_are_written_into_every_row_and_skip_the_numbering() {
        let shape = [None, Some("'scheduled'"), None, Some("NULL")];
        assert_eq!(
            shaped_rows(2, &shape, dollar),
            "($1, 'scheduled', $2, NULL), ($3, 'scheduled', $4, NULL)"
        );
        assert_eq!(
            shaped_rows(2, &shape, question_mark),
            "(?, 'scheduled', ?, NULL), (?, 'scheduled', ?, NULL)"
        );
    }

    #[test]
    fn batches_split_into_few_statement_shapes() {
        for n in [0, 1, 2, 3, 255, 256, 500, 511, 512, 513, 1000, 1300] {
            let items: Vec<usize> = (0..n).collect();
            let chunks: Vec<&[usize]> = shaped_chunks(&items).collect();
            assert_eq!(chunks.concat(), items, "{n} items, in order, once each");
            let lengths: Vec<usize> = chunks.iter().map(|c| c.len()).collect();
            assert!(
                lengths
                    .iter()
                    .all(|l| (l.is_power_of_two() && *l < CHUNK) || *l == CHUNK),
                "{n}: {lengths:?}"
            );
            assert!(lengths.is_sorted_by(|a, b| a >= b), "{n}: {lengths:?}");
            assert!(
                lengths.len() <= n / CHUNK + CHUNK.ilog2() as usize,
                "{n}: {lengths:?}"
            );
        }
    }
}

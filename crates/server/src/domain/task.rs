//! Tasks, their states and the status changes the recorder writes.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Sortable task identifier (UUIDv7: ordered by creation time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(Uuid);

impl TaskId {
    /// Returns a fresh, time-ordered id.
    pub fn new() -> Self {
        Self(v7(&LAST_ID, Utc::now().timestamp_millis().max(0) as u64))
    }

    /// Returns a fresh id of a booked task, timed by the claim store's clock
    /// (`at_ms`, never this host's): a missing claim counts as scheduled only
    /// for ids no older than their hash's mark (see `Claims::mark`).
    pub fn booked(at_ms: i64) -> Self {
        Self(v7(&LAST_BOOKED, at_ms.max(0) as u64))
    }
}

/// Bits of a v7 id's counter: `rand_a` (12) and the top 30 of `rand_b`.
const COUNTER_BITS: u32 = 42;

/// The millisecond and counter of the last id this process made.
static LAST_ID: std::sync::Mutex<(u64, u64)> = std::sync::Mutex::new((0, 0));

/// The same for booked ids: kept apart so that this host's clock, maybe
/// ahead of the claim store's, never dates a booked id.
static LAST_BOOKED: std::sync::Mutex<(u64, u64)> = std::sync::Mutex::new((0, 0));

/// Makes a UUIDv7 for `now_ms` that sorts after every id this process made
/// before (RFC 9562, a counter seeded at random each millisecond, then 32
/// random bits). `Uuid::now_v7` does the same but asks the kernel for its
/// random bits, one system call per id: 6 % of the server's time while a
/// batch is booked. The thread's CSPRNG serves here.
fn v7(state: &std::sync::Mutex<(u64, u64)>, now_ms: u64) -> Uuid {
    use rand::Rng as _;
    let mut rng = rand::rng();
    let (ms, counter) = {
        let mut last = state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if now_ms > last.0 {
            // Its top bit clear, so the counter has room to count.
            *last = (now_ms, rng.random::<u64>() >> (64 - COUNTER_BITS + 1));
        } else {
            last.1 += 1;
            if last.1 >> COUNTER_BITS != 0 {
                *last = (last.0 + 1, 0);
            }
        }
        *last
    };
    let rand_a = (counter >> 30) as u16;
    let rand_b = ((counter & ((1 << 30) - 1)) << 32) | u64::from(rng.random::<u32>());
    let mut bytes = [0u8; 10];
    bytes[..2].copy_from_slice(&rand_a.to_be_bytes());
    bytes[2..].copy_from_slice(&rand_b.to_be_bytes());
    uuid::Builder::from_unix_timestamp_millis(ms, &bytes).into_uuid()
}

impl Default for TaskId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl FromStr for TaskId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

/// Where a task is in its life cycle (see DESIGN.md, "The task state machine").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskState {
    /// Stored, waiting for its due time.
    Scheduled,
    /// Released to its queue, not started.
    Dispatched,
    /// An attempt is running.
    Running,
    /// The last attempt succeeded.
    Succeeded,
    /// Failed; another attempt follows.
    Retrying,
    /// Will not run again.
    Dead,
    /// Cancelled before it started.
    Cancelled,
    /// Could not start before its deadline.
    Expired,
    /// An occurrence skipped because the previous one had not finished.
    Skipped,
}

impl TaskState {
    /// Every state, in life-cycle order.
    pub const ALL: [TaskState; 9] = [
        Self::Scheduled,
        Self::Dispatched,
        Self::Running,
        Self::Succeeded,
        Self::Retrying,
        Self::Dead,
        Self::Cancelled,
        Self::Expired,
        Self::Skipped,
    ];

    /// Returns the name stored in SQL.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Dispatched => "dispatched",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Retrying => "retrying",
            Self::Dead => "dead",
            Self::Cancelled => "cancelled",
            Self::Expired => "expired",
            Self::Skipped => "skipped",
        }
    }

    /// Parses a name stored in SQL.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == s)
    }

    /// Tells whether no further transition can happen.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Dead | Self::Cancelled | Self::Expired | Self::Skipped
        )
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Returns the ordering key of a state change, so that status writes arriving
/// out of order (dispatcher and workers report through different replicas)
/// never move a task backwards.
pub fn version_of(state: TaskState, attempt: u32) -> i64 {
    let attempt = i64::from(attempt);
    match state {
        TaskState::Scheduled => 0,
        TaskState::Dispatched => 1,
        TaskState::Running => attempt * 10 + 2,
        TaskState::Retrying => attempt * 10 + 3,
        TaskState::Succeeded
        | TaskState::Dead
        | TaskState::Cancelled
        | TaskState::Expired
        | TaskState::Skipped => i64::MAX,
    }
}

/// Rounds an instant up to the whole millisecond: due times are kept in ms,
/// and rounding down would let a task start before the instant it was given.
pub(crate) fn ceil_ms(at: DateTime<Utc>) -> DateTime<Utc> {
    let ms = at.timestamp_millis();
    let floor = DateTime::from_timestamp_millis(ms).unwrap_or(at);
    if floor == at {
        at
    } else {
        DateTime::from_timestamp_millis(ms + 1).unwrap_or(at)
    }
}

/// Returns the start (ms since epoch) of the bucket that holds `at_ms`.
pub fn bucket_of(at_ms: i64, width_ms: i64) -> i64 {
    at_ms.div_euclid(width_ms) * width_ms
}

/// Returns the fingerprint of a schedule request, used to tell a retried
/// request (same idempotency key, same content) from a conflicting one.
pub fn content_hash(
    queue: &str,
    payload: &[u8],
    content_type: &str,
    headers: &BTreeMap<String, String>,
    when: &str,
    expire_after_ms: Option<i64>,
    max_attempts: Option<u32>,
) -> String {
    let mut hasher = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    field(queue.as_bytes());
    field(payload);
    field(content_type.as_bytes());
    for (name, value) in headers {
        field(name.as_bytes());
        field(value.as_bytes());
    }
    field(when.as_bytes());
    field(&expire_after_ms.unwrap_or(-1).to_le_bytes());
    field(&max_attempts.map_or(-1, i64::from).to_le_bytes());
    hex(&hasher.finalize())
}

/// Lower-case hex of a digest; one `format!` per byte cost more than the hash.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// A task's own retry delays; `None` fields follow its queue's policy.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Backoff {
    /// Delay before the second attempt, ms.
    pub initial_ms: Option<i64>,
    /// Longest delay, ms.
    pub max_ms: Option<i64>,
    /// Growth per attempt.
    pub multiplier: Option<f64>,
    /// Random variation, as a fraction either way.
    pub jitter: Option<f64>,
}

impl Backoff {
    /// Returns the text that stands for it in a request fingerprint.
    pub fn fingerprint(&self) -> String {
        format!(
            "backoff:{:?}:{:?}:{:?}:{:?}",
            self.initial_ms, self.max_ms, self.multiplier, self.jitter
        )
    }
}

/// A validated task, ready to be stored.
#[derive(Debug, Clone)]
pub struct NewTask {
    /// Fresh id.
    pub id: TaskId,
    /// Queue it runs on (a valid subject token).
    pub queue: String,
    /// Opaque payload.
    pub payload: Bytes,
    /// Media type of the payload.
    pub content_type: String,
    /// Producer headers, sorted so the fingerprint is stable.
    pub headers: BTreeMap<String, String>,
    /// Due instant.
    pub due_at: DateTime<Utc>,
    /// Start deadline.
    pub expire_at: Option<DateTime<Utc>>,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// Producer's idempotency key.
    pub idempotency_key: Option<String>,
    /// Fingerprint of the request, compared on a repeated idempotency key;
    /// empty without a key, since nothing would ever compare it.
    pub content_hash: String,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// The recurring schedule and nominal fire time it is an occurrence of.
    pub occurrence: Option<Occurrence>,
    /// Its own retry delays, over its queue's.
    pub backoff: Option<Backoff>,
}

/// Where an occurrence of a recurring schedule comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Occurrence {
    /// The schedule.
    pub schedule_id: TaskId,
    /// Its nominal fire time (before jitter).
    pub fire_at: DateTime<Utc>,
}

impl NewTask {
    /// Turns this task into its status record as it is right after
    /// scheduling into `bucket_ms`.
    pub fn into_record(self, bucket_ms: i64) -> TaskRecord {
        TaskRecord {
            id: self.id,
            queue: self.queue,
            state: TaskState::Scheduled,
            due_at: self.due_at,
            bucket_ms,
            expire_at: self.expire_at,
            max_attempts: self.max_attempts,
            attempts: 0,
            idempotency_key: self.idempotency_key,
            content_type: self.content_type,
            payload_size: self.payload.len() as u64,
            last_error: None,
            created_at: self.created_at,
            updated_at: self.created_at,
            occurrence: self.occurrence,
        }
    }
}

/// The status view of a stored task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRecord {
    /// Task id.
    pub id: TaskId,
    /// Queue.
    pub queue: String,
    /// Current state.
    pub state: TaskState,
    /// Due instant.
    pub due_at: DateTime<Utc>,
    /// Bucket whose Redis hash holds the task's claim state.
    pub bucket_ms: i64,
    /// Start deadline.
    pub expire_at: Option<DateTime<Utc>>,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// Attempts started so far.
    pub attempts: u32,
    /// Producer's idempotency key.
    pub idempotency_key: Option<String>,
    /// Media type of the payload.
    pub content_type: String,
    /// Payload size in bytes.
    pub payload_size: u64,
    /// Error of the last failed attempt.
    pub last_error: Option<String>,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// Last state change.
    pub updated_at: DateTime<Utc>,
    /// The recurring schedule it is an occurrence of, if any.
    pub occurrence: Option<Occurrence>,
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// The handler succeeded.
    Succeeded,
    /// Failed; retried later.
    Failed,
    /// Failed for good.
    Terminal,
}

impl AttemptOutcome {
    /// Returns the name stored in SQL.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Terminal => "terminal",
        }
    }

    /// Parses a name stored in SQL.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Succeeded, Self::Failed, Self::Terminal]
            .into_iter()
            .find(|o| o.as_str() == s)
    }
}

/// One row of a task's run log.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRecord {
    /// Attempt number, from 1.
    pub attempt: u32,
    /// Worker that ran it.
    pub worker_id: String,
    /// Handler start.
    pub started_at: DateTime<Utc>,
    /// Handler end, once ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// Outcome, once ended.
    pub outcome: Option<AttemptOutcome>,
    /// Error of a failed attempt.
    pub error: Option<String>,
    /// What the handler said about it.
    pub detail: Option<String>,
}

/// A status change for the SQL task index and run log.
#[derive(Debug, Clone, PartialEq)]
pub enum StatusWrite {
    /// Released to its queue.
    Dispatched {
        /// Task.
        id: TaskId,
        /// When.
        at: DateTime<Utc>,
    },
    /// A worker started an attempt.
    Started {
        /// Task.
        id: TaskId,
        /// Attempt number.
        attempt: u32,
        /// Worker.
        worker_id: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// An attempt ended; `state` is Succeeded, Retrying or Dead.
    Finished {
        /// Task.
        id: TaskId,
        /// Attempt number.
        attempt: u32,
        /// Worker.
        worker_id: String,
        /// The task's new state.
        state: TaskState,
        /// Error text for failures.
        error: Option<String>,
        /// What the handler said about the attempt.
        detail: Option<String>,
        /// When.
        at: DateTime<Utc>,
    },
    /// Cancelled, or expired before it could start.
    Closed {
        /// Task.
        id: TaskId,
        /// Cancelled or Expired.
        state: TaskState,
        /// When.
        at: DateTime<Utc>,
    },
}

impl StatusWrite {
    /// Returns the task the change is about.
    pub fn task_id(&self) -> TaskId {
        match self {
            Self::Dispatched { id, .. }
            | Self::Started { id, .. }
            | Self::Finished { id, .. }
            | Self::Closed { id, .. } => *id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_v7_and_sort_by_creation_even_within_a_millisecond() {
        let before = Utc::now().timestamp_millis() as u64;
        let ids: Vec<Uuid> = (0..10_000).map(|_| TaskId::new().0).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "strictly increasing");
        for id in &ids {
            assert_eq!(id.get_version_num(), 7);
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
        }
        let (secs, nanos) = ids[0].get_timestamp().expect("v7").to_unix();
        let ms = secs * 1000 + u64::from(nanos) / 1_000_000;
        assert!(ms >= before && ms <= before + 1000, "{ms} from {before}");

        // The same millisecond over and over (or a clock that went back):
        // still increasing, its counter counting.
        let same: Vec<Uuid> = (0..1000).map(|_| v7(&LAST_ID, before)).collect();
        assert!(same.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn booked_ids_carry_the_claim_clock_not_this_hosts() {
        // This host's ids ahead of the claim store's clock must not drag
        // booked ids forward: the mark comparison would count them wrong.
        let ahead = Utc::now().timestamp_millis() as u64 + 60_000;
        let _ = v7(&LAST_ID, ahead);
        let at = 1_700_000_000_123;
        let ids: Vec<TaskId> = (0..100).map(|_| TaskId::booked(at)).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        for id in ids {
            let (secs, nanos) = id.0.get_timestamp().expect("v7").to_unix();
            assert_eq!(secs * 1000 + u64::from(nanos) / 1_000_000, at as u64);
        }
    }

    #[test]
    fn due_times_round_up_to_the_millisecond() {
        let whole = DateTime::from_timestamp_millis(1_700_000_000_123).unwrap();
        assert_eq!(ceil_ms(whole), whole);
        let inside = whole + chrono::Duration::microseconds(1);
        assert_eq!(ceil_ms(inside).timestamp_millis(), 1_700_000_000_124);
        let before_epoch =
            DateTime::from_timestamp_millis(-5).unwrap() + chrono::Duration::microseconds(300);
        assert_eq!(ceil_ms(before_epoch).timestamp_millis(), -4);
    }

    #[test]
    fn buckets_floor_to_width() {
        assert_eq!(bucket_of(0, 600_000), 0);
        assert_eq!(bucket_of(599_999, 600_000), 0);
        assert_eq!(bucket_of(600_000, 600_000), 600_000);
        assert_eq!(bucket_of(-1, 600_000), -600_000);
    }

    #[test]
    fn versions_never_go_backwards_within_a_life_cycle() {
        let order = [
            version_of(TaskState::Scheduled, 0),
            version_of(TaskState::Dispatched, 0),
            version_of(TaskState::Running, 1),
            version_of(TaskState::Retrying, 1),
            version_of(TaskState::Running, 2),
            version_of(TaskState::Succeeded, 2),
        ];
        assert!(order.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn states_round_trip_through_their_names() {
        for state in TaskState::ALL {
            assert_eq!(TaskState::parse(state.as_str()), Some(state));
        }
    }

    #[test]
    fn content_hash_separates_fields() {
        let h = BTreeMap::new();
        let a = content_hash("q", b"ab", "", &h, "x", None, None);
        let b = content_hash("qa", b"b", "", &h, "x", None, None);
        assert_ne!(a, b);
        assert_eq!(a, content_hash("q", b"ab", "", &h, "x", None, None));
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn hex_is_lower_case_two_digits_per_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
    }
}

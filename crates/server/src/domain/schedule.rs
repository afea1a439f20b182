//! Recurring schedules: the stored definition, its validation, and how one
//! fire time becomes an ordinary task (an occurrence).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use super::recurrence::{MissingDay, Recurrence};
use super::task::{NewTask, Occurrence, TaskId, content_hash, hex};
use super::validate::{Limits, ScheduleSpec, ValidationError, validate};

/// What a schedule does with fire times missed while Kairos was down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CatchUp {
    /// Missed fire times never run.
    #[default]
    Skip,
    /// The latest missed fire time runs once.
    One,
    /// Every missed fire time runs, up to the schedule's limit.
    All,
}

impl CatchUp {
    /// Returns the stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Skip => "skip",
            Self::One => "one",
            Self::All => "all",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "skip" => Some(Self::Skip),
            "one" => Some(Self::One),
            "all" => Some(Self::All),
            _ => None,
        }
    }
}

/// Whether an occurrence may start while the previous one has not finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overlap {
    /// Occurrences run whatever the previous one is doing.
    #[default]
    Allow,
    /// An occurrence due while the previous one runs or waits to retry is SKIPPED.
    Skip,
}

impl Overlap {
    /// Returns the stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Skip => "skip",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "allow" => Some(Self::Allow),
            "skip" => Some(Self::Skip),
            _ => None,
        }
    }
}

impl MissingDay {
    /// Returns the stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Skip => "skip",
            Self::LastDay => "last_day",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "skip" => Some(Self::Skip),
            "last_day" => Some(Self::LastDay),
            _ => None,
        }
    }
}

/// Missed fire times run under [`CatchUp::All`] when the request does not say.
const DEFAULT_CATCH_UP_LIMIT: u32 = 100;
/// Most missed fire times a schedule may ask to run.
const MAX_CATCH_UP_LIMIT: u32 = 10_000;
/// Largest jitter.
const MAX_JITTER: Duration = Duration::from_secs(24 * 3600);

/// A create request as the producer sent it, before validation.
#[derive(Debug, Clone, Default)]
pub struct RecurringSpec {
    /// Queue of every occurrence.
    pub queue: String,
    /// Payload of every occurrence.
    pub payload: Bytes,
    /// Media type.
    pub content_type: String,
    /// Headers of every occurrence.
    pub headers: BTreeMap<String, String>,
    /// Cron spec or interval.
    pub spec: String,
    /// IANA zone; empty for UTC.
    pub time_zone: String,
    /// Policy for days a month lacks.
    pub missing_day: MissingDay,
    /// First instant a fire time may fall on; now when unset.
    pub start_at: Option<DateTime<Utc>>,
    /// Last instant a fire time may fall on.
    pub end_at: Option<DateTime<Utc>>,
    /// Most occurrences; 0 for no limit.
    pub max_occurrences: u32,
    /// Largest delay added to each occurrence's due time.
    pub jitter: Duration,
    /// Policy for missed fire times.
    pub catch_up: CatchUp,
    /// Most missed fire times run under [`CatchUp::All`]; 0 for the default.
    pub catch_up_limit: u32,
    /// Whether an occurrence may start while the previous one has not finished.
    pub overlap: Overlap,
    /// Start deadline of each occurrence after its due time, in ms.
    pub expire_after_ms: Option<i64>,
    /// Attempts of each occurrence.
    pub max_attempts: Option<u32>,
    /// Producer's idempotency key.
    pub idempotency_key: Option<String>,
}

/// A stored recurring schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// Schedule id (UUIDv7).
    pub id: TaskId,
    /// Queue of every occurrence.
    pub queue: String,
    /// Payload of every occurrence.
    pub payload: Bytes,
    /// Media type.
    pub content_type: String,
    /// Headers of every occurrence.
    pub headers: BTreeMap<String, String>,
    /// The spec as given.
    pub spec: String,
    /// IANA zone name.
    pub time_zone: String,
    /// Policy for days a month lacks.
    pub missing_day: MissingDay,
    /// First instant a fire time may fall on; intervals count from it.
    pub start_at: DateTime<Utc>,
    /// Last instant a fire time may fall on.
    pub end_at: Option<DateTime<Utc>>,
    /// Most occurrences; 0 for no limit.
    pub max_occurrences: u32,
    /// Largest delay added to each occurrence's due time.
    pub jitter: Duration,
    /// Policy for missed fire times.
    pub catch_up: CatchUp,
    /// Most missed fire times run under [`CatchUp::All`].
    pub catch_up_limit: u32,
    /// Whether an occurrence may start while the previous one has not finished.
    pub overlap: Overlap,
    /// Start deadline of each occurrence after its due time, in ms.
    pub expire_after_ms: Option<i64>,
    /// Attempts of each occurrence.
    pub max_attempts: u32,
    /// Producer's idempotency key.
    pub idempotency_key: Option<String>,
    /// Fingerprint of the create request.
    pub content_hash: String,
    /// Paused schedules make no occurrences.
    pub paused: bool,
    /// Occurrences made so far.
    pub occurrences: u64,
    /// The next fire time not yet made into a task; `None` once finished.
    pub next_fire_at: Option<DateTime<Utc>>,
    /// Creation instant.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

impl Schedule {
    /// Parses the stored rule (it was checked at creation).
    pub fn rule(&self) -> Result<Recurrence, ValidationError> {
        Recurrence::parse(&self.spec, &self.time_zone, self.missing_day)
    }

    /// Returns the first fire time strictly after `t` that the schedule
    /// allows (end time and occurrence limit count `made` occurrences so far).
    pub fn next_after(
        &self,
        rule: &Recurrence,
        t: DateTime<Utc>,
        made: u64,
    ) -> Option<DateTime<Utc>> {
        if self.max_occurrences > 0 && made >= u64::from(self.max_occurrences) {
            return None;
        }
        let earliest = self.start_at - chrono::TimeDelta::milliseconds(1);
        let next = rule.next_after(self.start_at, t.max(earliest))?;
        match self.end_at {
            Some(end) if next > end => None,
            _ => Some(next),
        }
    }

    /// Returns up to `n` upcoming fire times not yet made into tasks.
    pub fn upcoming(&self, n: usize) -> Vec<DateTime<Utc>> {
        let (Some(first), Ok(rule)) = (self.next_fire_at, self.rule()) else {
            return Vec::new();
        };
        let mut out = vec![first];
        while out.len() < n {
            let made = self.occurrences + out.len() as u64;
            match self.next_after(&rule, *out.last().expect("non-empty"), made) {
                Some(next) => out.push(next),
                None => break,
            }
        }
        out
    }

    /// Builds the task of the occurrence at `fire_at`. Its idempotency key is
    /// `<schedule id>@<fire ms>`, so every replica, and a retry after a
    /// crash, makes the same occurrence only once.
    pub fn occurrence(&self, fire_at: DateTime<Utc>, now: DateTime<Utc>) -> NewTask {
        let key = format!("{}@{}", self.id, fire_at.timestamp_millis());
        let due_at = fire_at + self.jitter_for(fire_at);
        let expire_at = self
            .expire_after_ms
            .map(|ms| due_at + chrono::TimeDelta::milliseconds(ms));
        let hash = content_hash(
            &self.queue,
            &self.payload,
            &self.content_type,
            &self.headers,
            &key,
            self.expire_after_ms,
            Some(self.max_attempts),
        );
        NewTask {
            backoff: None,
            id: TaskId::new(),
            queue: self.queue.clone(),
            payload: self.payload.clone(),
            content_type: self.content_type.clone(),
            headers: self.headers.clone(),
            due_at,
            expire_at,
            max_attempts: self.max_attempts,
            idempotency_key: Some(key),
            content_hash: hash,
            created_at: now,
            occurrence: Some(Occurrence {
                schedule_id: self.id,
                fire_at,
            }),
        }
    }

    /// The occurrence's delay: a fixed fraction of the jitter, from a hash of
    /// the schedule id and fire time, so every replica and retry agree.
    fn jitter_for(&self, fire_at: DateTime<Utc>) -> chrono::TimeDelta {
        let jitter_ms = self.jitter.as_millis() as u64;
        if jitter_ms == 0 {
            return chrono::TimeDelta::zero();
        }
        let digest = Sha256::digest(format!("{}@{}", self.id, fire_at.timestamp_millis()));
        let mut word = [0u8; 8];
        word.copy_from_slice(&digest[..8]);
        chrono::TimeDelta::milliseconds((u64::from_le_bytes(word) % (jitter_ms + 1)) as i64)
    }
}

/// Checks a create request and returns the schedule to store, with its first
/// fire time; `min_interval` is the shortest gap allowed between fire times.
pub fn validate_schedule(
    spec: RecurringSpec,
    now: DateTime<Utc>,
    limits: &Limits,
    min_interval: Duration,
) -> Result<Schedule, ValidationError> {
    // The task fields are checked as a one-off task's are.
    let template = validate(
        ScheduleSpec {
            queue: spec.queue.clone(),
            payload: spec.payload.clone(),
            content_type: spec.content_type.clone(),
            headers: spec.headers.clone(),
            run_at: Some(now),
            delay_ms: None,
            idempotency_key: spec.idempotency_key.clone(),
            expire_after_ms: spec.expire_after_ms,
            max_attempts: spec.max_attempts,
            backoff: None,
        },
        now,
        limits,
    )?;
    let rule = Recurrence::parse(&spec.spec, &spec.time_zone, spec.missing_day)?;
    let start_at = spec.start_at.unwrap_or(now);
    rule.check(start_at.max(now), min_interval)?;
    if let Some(end) = spec.end_at
        && end <= start_at
    {
        return Err(ValidationError::invalid("end_at", "must be after start_at"));
    }
    if spec.jitter > MAX_JITTER {
        return Err(ValidationError::invalid(
            "jitter",
            format!("must be at most {}", humantime::format_duration(MAX_JITTER)),
        ));
    }
    let catch_up_limit = match spec.catch_up_limit {
        0 => DEFAULT_CATCH_UP_LIMIT,
        n if n > MAX_CATCH_UP_LIMIT => {
            return Err(ValidationError::invalid(
                "catch_up_limit",
                format!("must be at most {MAX_CATCH_UP_LIMIT}"),
            ));
        }
        n => n,
    };
    let time_zone = if spec.time_zone.trim().is_empty() {
        "UTC".to_owned()
    } else {
        spec.time_zone.trim().to_owned()
    };
    // The fingerprint covers what the producer sent, not what the server
    // filled in (an unset start is "now", different on every retry).
    let task_hash = content_hash(
        &template.queue,
        &template.payload,
        &template.content_type,
        &template.headers,
        "recurring",
        spec.expire_after_ms,
        spec.max_attempts,
    );
    let mut hasher = Sha256::new();
    for part in [
        task_hash.as_str(),
        spec.spec.trim(),
        &time_zone,
        spec.missing_day.as_str(),
        &spec
            .start_at
            .map_or(-1, |t| t.timestamp_millis())
            .to_string(),
        &spec.end_at.map_or(-1, |t| t.timestamp_millis()).to_string(),
        &spec.max_occurrences.to_string(),
        &spec.jitter.as_millis().to_string(),
        spec.catch_up.as_str(),
        &catch_up_limit.to_string(),
        spec.overlap.as_str(),
    ] {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    let digest = hasher.finalize();
    let mut schedule = Schedule {
        id: TaskId::new(),
        queue: template.queue,
        payload: template.payload,
        content_type: template.content_type,
        headers: template.headers,
        spec: spec.spec.trim().to_owned(),
        time_zone,
        missing_day: spec.missing_day,
        start_at,
        end_at: spec.end_at,
        max_occurrences: spec.max_occurrences,
        jitter: spec.jitter,
        catch_up: spec.catch_up,
        catch_up_limit,
        overlap: spec.overlap,
        expire_after_ms: spec.expire_after_ms,
        max_attempts: template.max_attempts,
        idempotency_key: spec.idempotency_key,
        content_hash: hex(&digest),
        paused: false,
        occurrences: 0,
        next_fire_at: None,
        created_at: now,
        updated_at: now,
    };
    // Fire times before now are not "missed" at creation: start from now.
    schedule.next_fire_at = schedule.next_after(&rule, now - chrono::TimeDelta::milliseconds(1), 0);
    if schedule.next_fire_at.is_none() {
        return Err(ValidationError::invalid(
            "spec",
            "never fires between start_at and end_at",
        ));
    }
    Ok(schedule)
}

/// Fields UpdateRecurring may change.
const UPDATABLE: [&str; 14] = [
    "payload",
    "content_type",
    "headers",
    "spec",
    "time_zone",
    "missing_day",
    "end_at",
    "max_occurrences",
    "jitter",
    "catch_up",
    "catch_up_limit",
    "overlap",
    "expire_after",
    "max_attempts",
];

/// Applies the fields of `changes` named in `mask` to `current`, checks the
/// result as a new schedule would be checked, and returns it. The new rule
/// takes over from the next fire time not yet made into a task.
pub fn apply_update(
    current: &Schedule,
    changes: RecurringSpec,
    mask: &[String],
    now: DateTime<Utc>,
    limits: &Limits,
    min_interval: Duration,
) -> Result<Schedule, ValidationError> {
    if mask.is_empty() {
        return Err(ValidationError::invalid(
            "update_mask",
            "name the fields to change",
        ));
    }
    let mut merged = RecurringSpec {
        queue: current.queue.clone(),
        payload: current.payload.clone(),
        content_type: current.content_type.clone(),
        headers: current.headers.clone(),
        spec: current.spec.clone(),
        time_zone: current.time_zone.clone(),
        missing_day: current.missing_day,
        start_at: Some(current.start_at),
        end_at: current.end_at,
        max_occurrences: current.max_occurrences,
        jitter: current.jitter,
        catch_up: current.catch_up,
        catch_up_limit: current.catch_up_limit,
        overlap: current.overlap,
        expire_after_ms: current.expire_after_ms,
        max_attempts: Some(current.max_attempts),
        idempotency_key: None,
    };
    for path in mask {
        match path.as_str() {
            "payload" => merged.payload = changes.payload.clone(),
            "content_type" => merged.content_type = changes.content_type.clone(),
            "headers" => merged.headers = changes.headers.clone(),
            "spec" => merged.spec = changes.spec.clone(),
            "time_zone" => merged.time_zone = changes.time_zone.clone(),
            "missing_day" => merged.missing_day = changes.missing_day,
            "end_at" => merged.end_at = changes.end_at,
            "max_occurrences" => merged.max_occurrences = changes.max_occurrences,
            "jitter" => merged.jitter = changes.jitter,
            "catch_up" => merged.catch_up = changes.catch_up,
            "catch_up_limit" => merged.catch_up_limit = changes.catch_up_limit,
            "overlap" => merged.overlap = changes.overlap,
            "expire_after" => merged.expire_after_ms = changes.expire_after_ms,
            "max_attempts" => merged.max_attempts = changes.max_attempts,
            other => {
                return Err(ValidationError::invalid(
                    "update_mask",
                    format!(
                        "`{other}` cannot be changed; the fields that can are {}",
                        UPDATABLE.join(", ")
                    ),
                ));
            }
        }
    }
    // The checked definition, with the identity and progress of the current one.
    let mut updated = Schedule {
        id: current.id,
        start_at: current.start_at,
        idempotency_key: current.idempotency_key.clone(),
        content_hash: current.content_hash.clone(),
        paused: current.paused,
        occurrences: current.occurrences,
        created_at: current.created_at,
        updated_at: now,
        ..validate_schedule(merged, now, limits, min_interval)?
    };
    // Fire times before the next one not yet made stay as they were; a stale
    // one (paused, or Kairos down) keeps its place so catch-up still applies.
    let boundary = current.next_fire_at.unwrap_or(now);
    let rule = updated.rule()?;
    updated.next_fire_at = updated.next_after(
        &rule,
        boundary - chrono::TimeDelta::milliseconds(1),
        updated.occurrences,
    );
    Ok(updated)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_payload_bytes: 1024,
            max_horizon: Duration::from_secs(3600 * 24 * 400),
            default_max_attempts: 3,
            max_attempts_limit: 100,
        }
    }

    #[test]
    fn jitter_is_bounded_and_the_same_on_every_replica() {
        let now = Utc::now();
        let spec = RecurringSpec {
            queue: "q".into(),
            spec: "* * * * *".into(),
            jitter: Duration::from_secs(30),
            ..RecurringSpec::default()
        };
        let schedule =
            validate_schedule(spec, now, &limits(), Duration::from_secs(1)).expect("valid");
        let mut offsets = std::collections::HashSet::new();
        for minute in 0..50 {
            let fire = now + chrono::TimeDelta::minutes(minute);
            let first = schedule.occurrence(fire, now);
            let again = schedule.occurrence(fire, now + chrono::TimeDelta::seconds(5));
            assert_eq!(first.due_at, again.due_at, "retries agree");
            assert_eq!(first.idempotency_key, again.idempotency_key);
            let offset = first.due_at - fire;
            assert!(offset >= chrono::TimeDelta::zero());
            assert!(offset <= chrono::TimeDelta::seconds(30));
            offsets.insert(offset);
        }
        assert!(offsets.len() > 10, "offsets vary between occurrences");
    }

    #[test]
    fn occurrence_limit_and_end_stop_the_schedule() {
        let now = DateTime::from_timestamp(1_800_000_000, 0).expect("valid");
        let spec = RecurringSpec {
            queue: "q".into(),
            spec: "every 10s".into(),
            start_at: Some(now),
            end_at: Some(now + chrono::TimeDelta::seconds(25)),
            max_occurrences: 2,
            ..RecurringSpec::default()
        };
        let schedule =
            validate_schedule(spec, now, &limits(), Duration::from_secs(1)).expect("valid");
        assert_eq!(schedule.next_fire_at, Some(now));
        // Two occurrences allowed: the third fire time is refused by the limit.
        assert_eq!(
            schedule.upcoming(5),
            vec![now, now + chrono::TimeDelta::seconds(10)]
        );
        let rule = schedule.rule().expect("rule");
        assert_eq!(
            schedule.next_after(&rule, now + chrono::TimeDelta::seconds(20), 0),
            None,
            "30 s is after end_at"
        );
    }
}

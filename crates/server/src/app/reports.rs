//! What happens when a worker asks to start an attempt or reports its end.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tracing::instrument;

use super::{AppError, AppResult, QueueService, Recorder};
use crate::domain::{StatusWrite, TaskId, TaskState};
use crate::store::DynStore;
use crate::store::claims::{Claims, FinishClaim, FinishRequest, StartClaim, StartRequest};

/// A worker's request to start an attempt.
#[derive(Debug, Clone)]
pub struct AttemptStart {
    /// Task id as the worker read it from the envelope.
    pub task_id: String,
    /// Attempt number (the JetStream delivery count).
    pub attempt: u32,
    /// Bucket holding the claim.
    pub bucket_ms: i64,
    /// Start deadline, ms since epoch, 0 when none.
    pub expire_at_ms: i64,
    /// Queue, for its rate limit (empty from workers that do not send it).
    pub queue: String,
    /// Due instant, ms since epoch; a start asked before it waits (0: no check).
    pub due_at_ms: i64,
    /// Worker identity.
    pub worker_id: String,
}

/// A worker's report of an attempt's end.
#[derive(Debug, Clone)]
pub struct AttemptEnd {
    /// Task id.
    pub task_id: String,
    /// Attempt number.
    pub attempt: u32,
    /// Bucket holding the claim.
    pub bucket_ms: i64,
    /// Succeeded, Retrying or Dead.
    pub state: TaskState,
    /// Error text for failures.
    pub error: Option<String>,
    /// What the handler said about the attempt.
    pub detail: Option<String>,
    /// When it ended.
    pub at: DateTime<Utc>,
    /// Worker identity.
    pub worker_id: String,
}

/// Whether a worker may run an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartOutcome {
    /// Run it.
    Run,
    /// Skip it, for this reason.
    Skip(String),
    /// Ask again after `ms` milliseconds, for `reason`: the task is not due
    /// yet, or its queue's rate limit is reached.
    Wait {
        /// How long to wait.
        ms: i64,
        /// Why, for the worker's log.
        reason: &'static str,
    },
}

/// Returns how long a start asked before its task's due time must wait
/// (released ahead by KAIROS_RELEASE_LEAD, by a worker whose clock runs ahead
/// of ours); `None` once it is due.
fn not_due_for(start: &AttemptStart, now_ms: i64) -> Option<i64> {
    (start.due_at_ms > now_ms).then(|| start.due_at_ms - now_ms)
}

/// Returns the claim request for a start.
fn request(s: &AttemptStart) -> StartRequest<'_> {
    StartRequest {
        bucket_ms: s.bucket_ms,
        id: &s.task_id,
        attempt: s.attempt,
        expire_at_ms: s.expire_at_ms,
    }
}

/// How long an attempt this server let start stays in [`QuietEnds`]: a
/// longer one has its success claimed in Redis, as after a restart.
const QUIET_FOR: Duration = Duration::from_secs(300);

/// Most attempts kept in one generation of [`QuietEnds`].
const MOST_QUIET: usize = 1_000_000;

/// Attempts this server let start on a claim without an overlap marker:
/// their success is recorded in SQL only, which saves a Redis claim per task
/// (see `store::claims`). Kept in two generations, so attempts whose end
/// never comes (their worker lost) are forgotten; a success not found here
/// (another replica's start, a restart, a very long run) is claimed as before.
#[derive(Debug)]
struct QuietEnds {
    current: HashSet<(TaskId, u32)>,
    previous: HashSet<(TaskId, u32)>,
    since: Instant,
    /// A generation's age and size limits.
    keep: Duration,
    most: usize,
}

impl QuietEnds {
    fn new(keep: Duration, most: usize) -> Self {
        Self {
            current: HashSet::new(),
            previous: HashSet::new(),
            since: Instant::now(),
            keep,
            most,
        }
    }

    /// Remembers an attempt that started without an overlap marker.
    fn note(&mut self, id: TaskId, attempt: u32) {
        if self.current.len() >= self.most || self.since.elapsed() >= self.keep {
            self.previous = std::mem::take(&mut self.current);
            self.since = Instant::now();
        }
        self.current.insert((id, attempt));
    }

    /// Forgets an attempt; true when this server let it start quietly.
    fn take(&mut self, id: TaskId, attempt: u32) -> bool {
        self.current.remove(&(id, attempt)) || self.previous.remove(&(id, attempt))
    }
}

/// Decides starts and records results. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ReportService {
    store: DynStore,
    claims: Claims,
    recorder: Recorder,
    queues: QueueService,
    width_ms: i64,
    quiet: Arc<Mutex<QuietEnds>>,
}

impl ReportService {
    /// Creates the service over its backends.
    pub fn new(
        store: DynStore,
        claims: Claims,
        recorder: Recorder,
        queues: QueueService,
        width_ms: i64,
    ) -> Self {
        Self {
            store,
            claims,
            recorder,
            queues,
            width_ms,
            quiet: Arc::new(Mutex::new(QuietEnds::new(QUIET_FOR, MOST_QUIET))),
        }
    }

    fn quiet(&self) -> std::sync::MutexGuard<'_, QuietEnds> {
        self.quiet.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Returns, per start, how long it must wait (0: it may start): until its
    /// due time when asked early, else under its queue's rate limit. An early
    /// start takes no rate token. One Redis call for every limited start.
    async fn waits(&self, starts: &[AttemptStart], now_ms: i64) -> AppResult<Vec<i64>> {
        let mut waits = vec![0; starts.len()];
        let mut limited: Vec<(usize, f64, u32)> = Vec::new();
        // A batch is mostly one queue: look each up once, not once per start.
        let mut rates: HashMap<&str, Option<(f64, u32)>> = HashMap::new();
        for (i, start) in starts.iter().enumerate() {
            if let Some(wait) = not_due_for(start, now_ms) {
                waits[i] = wait;
                continue;
            }
            if !kairos_proto::wire::is_valid_queue(&start.queue) {
                continue;
            }
            let rate = match rates.get(start.queue.as_str()) {
                Some(rate) => *rate,
                None => {
                    let rate = self
                        .queues
                        .lookup(&start.queue)
                        .await?
                        .filter(|q| q.settings.rate_per_s > 0.0)
                        .map(|q| (q.settings.rate_per_s, q.settings.rate_burst));
                    rates.insert(&start.queue, rate);
                    rate
                }
            };
            if let Some((per_s, burst)) = rate {
                limited.push((i, per_s, burst));
            }
        }
        let requests: Vec<(&str, f64, u32)> = limited
            .iter()
            .map(|&(i, per_s, burst)| (starts[i].queue.as_str(), per_s, burst))
            .collect();
        let answers = self.claims.rate(now_ms, &requests).await?;
        for ((i, _, _), wait) in limited.iter().zip(answers) {
            waits[*i] = wait;
        }
        Ok(waits)
    }

    /// Moves tasks to RUNNING for one attempt each, atomically against cancel,
    /// expiry and duplicate deliveries; one Redis call decides the whole batch.
    /// Answers are in the order of `starts`.
    #[instrument(skip_all, fields(starts = starts.len()))]
    pub async fn start(&self, starts: Vec<AttemptStart>) -> AppResult<Vec<StartOutcome>> {
        let now_ms = Utc::now().timestamp_millis();
        // Asked early, or over its queue's rate, a start waits and touches no claim.
        let waits = self.waits(&starts, now_ms).await?;
        if waits.iter().all(|&w| w == 0) {
            return self.claim_starts(starts).await;
        }
        let (mut admitted, mut slots) = (Vec::new(), Vec::new());
        let mut outcomes: Vec<Option<StartOutcome>> = Vec::with_capacity(starts.len());
        for (start, wait) in starts.into_iter().zip(waits) {
            if wait > 0 {
                let reason = if not_due_for(&start, now_ms).is_some() {
                    "not due yet"
                } else {
                    "queue rate limit"
                };
                outcomes.push(Some(StartOutcome::Wait { ms: wait, reason }));
            } else {
                slots.push(outcomes.len());
                outcomes.push(None);
                admitted.push(start);
            }
        }
        for (slot, outcome) in slots.into_iter().zip(self.claim_starts(admitted).await?) {
            outcomes[slot] = Some(outcome);
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| StartOutcome::Skip("no answer".into())))
            .collect())
    }

    /// Claims starts in Redis and records the RUNNING ones; answers in order.
    async fn claim_starts(&self, starts: Vec<AttemptStart>) -> AppResult<Vec<StartOutcome>> {
        let now = Utc::now();
        let now_ms = now.timestamp_millis();
        let ids: Vec<Option<TaskId>> = starts.iter().map(|s| s.task_id.parse().ok()).collect();
        let requests: Vec<StartRequest<'_>> = starts
            .iter()
            .zip(&ids)
            .filter(|(_, id)| id.is_some())
            .map(|(s, _)| request(s))
            .collect();
        let mut claims = self
            .claims
            .start(self.width_ms, now_ms, &requests, false)
            .await?
            .into_iter();
        let mut outcomes = Vec::with_capacity(starts.len());
        let mut closed = Vec::new();
        for (start, id) in starts.into_iter().zip(ids) {
            let Some(id) = id else {
                outcomes.push(StartOutcome::Skip("malformed task id".into()));
                continue;
            };
            let mut claim = claims.next().ok_or_else(|| {
                AppError::Internal("claim answers do not match the starts".into())
            })?;
            if matches!(claim, StartClaim::Missing | StartClaim::Behind) {
                // Redis lost the claim, or an earlier attempt's end was not
                // claimed: SQL knows whether the task still may run.
                match self.store.get_task(id).await? {
                    None => {
                        outcomes.push(StartOutcome::Skip("unknown task".into()));
                        continue;
                    }
                    Some(task) if task.state.is_final() => {
                        outcomes.push(StartOutcome::Skip(format!("task is {}", task.state)));
                        continue;
                    }
                    Some(_) => {
                        let forced = self
                            .claims
                            .start(self.width_ms, now_ms, &[request(&start)], true)
                            .await?;
                        claim = forced.into_iter().next().unwrap_or(StartClaim::Missing);
                    }
                }
            }
            outcomes.push(match claim {
                StartClaim::Run { marker } => {
                    if !marker {
                        self.quiet().note(id, start.attempt);
                    }
                    // The Redis claim decides the start; the RUNNING row is status
                    // only, so the worker need not wait for its commit. The result
                    // write, which must be durable, is awaited in `finish`.
                    self.recorder
                        .record_soon(StatusWrite::Started {
                            id,
                            attempt: start.attempt,
                            worker_id: start.worker_id,
                            at: now,
                        })
                        .await;
                    StartOutcome::Run
                }
                StartClaim::Expired => {
                    closed.push(self.recorder.record(StatusWrite::Closed {
                        id,
                        state: TaskState::Expired,
                        at: now,
                    }));
                    StartOutcome::Skip("expired".into())
                }
                StartClaim::Skipped => {
                    closed.push(self.recorder.record(StatusWrite::Closed {
                        id,
                        state: TaskState::Skipped,
                        at: now,
                    }));
                    StartOutcome::Skip("the previous occurrence has not finished".into())
                }
                StartClaim::Cancelled => StartOutcome::Skip("cancelled".into()),
                StartClaim::Duplicate(claim) => StartOutcome::Skip(format!("duplicate ({claim})")),
                StartClaim::Missing | StartClaim::Behind => {
                    StartOutcome::Skip("claim missing".into())
                }
            });
        }
        futures::future::try_join_all(closed).await?;
        Ok(outcomes)
    }

    /// Records how attempts ended, in Redis (for races, one call for the
    /// batch; a success this server let start quietly goes to SQL only) and
    /// SQL (for status, committed before this returns).
    #[instrument(skip_all, fields(ends = ends.len()))]
    pub async fn finish(&self, ends: Vec<AttemptEnd>) -> AppResult<()> {
        let ends: Vec<(TaskId, AttemptEnd, bool)> = {
            let mut quiet = self.quiet();
            ends.into_iter()
                .filter_map(|end| {
                    let id: TaskId = end.task_id.parse().ok()?;
                    let quietly = quiet.take(id, end.attempt) && end.state == TaskState::Succeeded;
                    Some((id, end, quietly))
                })
                .collect()
        };
        let requests: Vec<FinishRequest<'_>> = ends
            .iter()
            .filter(|(_, _, quietly)| !quietly)
            .map(|(_, end, _)| FinishRequest {
                bucket_ms: end.bucket_ms,
                id: &end.task_id,
                attempt: end.attempt,
                outcome: match end.state {
                    TaskState::Succeeded => FinishClaim::Succeeded,
                    TaskState::Retrying => FinishClaim::Retrying,
                    _ => FinishClaim::Dead,
                },
            })
            .collect();
        self.claims.finish(self.width_ms, &requests).await?;
        drop(requests);
        futures::future::try_join_all(ends.into_iter().map(|(id, end, _)| {
            self.recorder.record(StatusWrite::Finished {
                id,
                attempt: end.attempt,
                worker_id: end.worker_id,
                state: end.state,
                error: end.error,
                detail: end.detail,
                at: end.at,
            })
        }))
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_ends_are_taken_once_and_forgotten_after_two_generations() {
        let mut quiet = QuietEnds::new(QUIET_FOR, 2);
        let [a, b, c, d] = [(); 4].map(|()| TaskId::new());
        quiet.note(a, 1);
        quiet.note(b, 1);
        // Full: a and b move to the previous generation.
        quiet.note(c, 1);
        assert!(quiet.take(a, 1), "found in the previous generation");
        assert!(!quiet.take(a, 1), "taken once");
        assert!(!quiet.take(b, 2), "another attempt of b did not start here");
        quiet.note(d, 1);
        // Full again: b, never taken (its worker lost), is forgotten.
        quiet.note(a, 2);
        assert!(!quiet.take(b, 1), "forgotten: its success would be claimed");
        assert!(quiet.take(c, 1));
        assert!(quiet.take(d, 1));
        assert!(quiet.take(a, 2));
    }
}

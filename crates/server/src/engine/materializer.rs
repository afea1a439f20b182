//! Turns the fire times of recurring schedules into ordinary tasks. Runs in
//! every replica: each fire time inside the look-ahead is booked as a task
//! whose idempotency key is `<schedule id>@<fire ms>`, then the schedule's
//! `next_fire_at` is moved on with a compare-and-set. Two replicas, or a crash
//! between the two steps, still make one task per fire time.
//!
//! Fire times more than `grace` in the past were missed (Kairos was down, or
//! the schedule paused): the schedule's catch-up policy says which run.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::app::{AppError, AppResult, TaskService};
use crate::domain::{CatchUp, Overlap, Recurrence, Schedule};
use crate::store::DynStore;

/// Schedules looked at per round.
const SCHEDULES_PER_ROUND: u32 = 1000;
/// Schedules advanced at once: each occurrence waits for a SQL commit and a
/// publish acknowledgement, so many schedules due at the same minute (daily
/// billing at 09:00) are booked side by side rather than one after another.
const SCHEDULES_AT_ONCE: usize = 32;
/// Occurrences one schedule may make per round, so one busy schedule cannot
/// hold up the others.
const OCCURRENCES_PER_ROUND: usize = 1000;
/// How far the scan for the latest missed fire time may go.
const MAX_MISSED_SCAN: usize = 1_000_000;

/// Materializer settings.
#[derive(Debug, Clone)]
pub struct MaterializeSettings {
    /// How far ahead fire times become tasks.
    pub ahead: Duration,
    /// How late a fire time may be and still run as usual.
    pub grace: Duration,
    /// Pause between rounds.
    pub tick: Duration,
}

/// The materializer loop of one replica.
#[derive(Debug)]
pub struct Materializer {
    store: DynStore,
    tasks: TaskService,
    settings: MaterializeSettings,
}

impl Materializer {
    /// Creates the loop over the store and the task use cases.
    pub fn new(store: DynStore, tasks: TaskService, settings: MaterializeSettings) -> Self {
        Self {
            store,
            tasks,
            settings,
        }
    }

    /// Runs rounds until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            if let Err(err) = self.round().await {
                debug!(error = %err, "materializer round failed; retrying");
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(self.settings.tick) => {}
            }
        }
    }

    async fn round(&self) -> AppResult<()> {
        let now = Utc::now();
        let ahead = chrono::TimeDelta::from_std(self.settings.ahead).unwrap_or_default();
        let due = self
            .store
            .due_schedules(now + ahead, SCHEDULES_PER_ROUND)
            .await?;
        futures::stream::iter(due)
            .for_each_concurrent(SCHEDULES_AT_ONCE, |schedule| async move {
                if let Err(err) = self.advance(schedule, now + ahead, now).await {
                    warn!(error = %err, "could not materialize a recurring schedule");
                }
            })
            .await;
        Ok(())
    }

    /// Makes the schedule's occurrences up to `until`, one compare-and-set each.
    async fn advance(
        &self,
        mut schedule: Schedule,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> AppResult<()> {
        let rule = schedule
            .rule()
            .map_err(|e| AppError::Internal(format!("schedule {}: {e}", schedule.id)))?;
        let grace = chrono::TimeDelta::from_std(self.settings.grace).unwrap_or_default();
        for _ in 0..OCCURRENCES_PER_ROUND {
            let Some(fire) = schedule.next_fire_at.filter(|f| *f <= until) else {
                break;
            };
            let (run, next) = if fire < now - grace {
                catch_up(&schedule, &rule, fire, now - grace)
            } else {
                (
                    Some(fire),
                    schedule.next_after(&rule, fire, schedule.occurrences),
                )
            };
            let made = u64::from(run.is_some());
            let limit = u64::from(schedule.max_occurrences);
            let next = next.filter(|_| limit == 0 || schedule.occurrences + made < limit);
            let mut occurrence = None;
            if let Some(at) = run {
                let skip_overlap = schedule.overlap == Overlap::Skip;
                let record = self
                    .tasks
                    .materialize(schedule.occurrence(at, Utc::now()), skip_overlap)
                    .await?;
                occurrence = Some(record.id);
            }
            if !self
                .store
                .advance_schedule(schedule.id, fire, next, made, Utc::now())
                .await?
            {
                // Another replica moved it first; it carries on from there.
                // Or the schedule was deleted while this occurrence was
                // made: the delete may have listed its occurrences before
                // this one's row existed, so it is cancelled here.
                if let Some(id) = occurrence
                    && self.store.get_schedule(schedule.id).await?.is_none()
                {
                    match self.tasks.cancel(id).await {
                        Ok(_) | Err(AppError::FailedPrecondition { .. }) => {}
                        Err(err) => return Err(err),
                    }
                }
                break;
            }
            schedule.next_fire_at = next;
            schedule.occurrences += made;
        }
        Ok(())
    }
}

/// Decides what a missed fire time does: returns the fire time to run now
/// (if any) and the next fire time to store. The occurrence limit is the
/// caller's to apply, once the number made is known.
fn catch_up(
    schedule: &Schedule,
    rule: &Recurrence,
    fire: DateTime<Utc>,
    missed_before: DateTime<Utc>,
) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
    let made = schedule.occurrences;
    // The first fire time that is not missed.
    let first_live = schedule.next_after(
        rule,
        missed_before - chrono::TimeDelta::milliseconds(1),
        made,
    );
    match schedule.catch_up {
        CatchUp::Skip => (None, first_live),
        CatchUp::One => {
            let latest = missed(schedule, rule, fire, missed_before).pop();
            (latest, first_live)
        }
        CatchUp::All => {
            let missed = missed(schedule, rule, fire, missed_before);
            let limit = schedule.catch_up_limit as usize;
            if missed.len() > limit {
                // Only the latest `limit` run: jump to the first of them.
                (None, Some(missed[missed.len() - limit]))
            } else {
                (Some(fire), schedule.next_after(rule, fire, made))
            }
        }
    }
}

/// Lists missed fire times from `fire` (included) up to `missed_before`.
fn missed(
    schedule: &Schedule,
    rule: &Recurrence,
    fire: DateTime<Utc>,
    missed_before: DateTime<Utc>,
) -> Vec<DateTime<Utc>> {
    let mut out = vec![fire];
    let mut at = fire;
    while out.len() < MAX_MISSED_SCAN {
        match schedule.next_after(rule, at, schedule.occurrences) {
            Some(next) if next < missed_before => {
                out.push(next);
                at = next;
            }
            _ => break,
        }
    }
    out
}

//! Recurring schedules: for now the preview of a spec's fire times, which
//! stores nothing.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::AppResult;
use crate::domain::{MissingDay, Recurrence, ValidationError};

/// Most fire times one preview returns.
pub const MAX_PREVIEW: u32 = 1000;

/// A preview request in domain terms.
#[derive(Debug, Clone)]
pub struct PreviewQuery {
    /// The spec as the user wrote it.
    pub spec: String,
    /// IANA zone name; empty for UTC.
    pub time_zone: String,
    /// Fire times strictly after this instant (intervals count from it).
    pub from: DateTime<Utc>,
    /// How many, 1 to [`MAX_PREVIEW`]; 0 means 10.
    pub count: u32,
    /// Policy for a day of month the month lacks.
    pub missing_day: MissingDay,
}

/// Recurring-schedule use cases. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RecurringService {
    min_interval: Duration,
}

impl RecurringService {
    /// Creates the service; specs firing more often than `min_interval` are refused.
    pub fn new(min_interval: Duration) -> Self {
        Self { min_interval }
    }

    /// Returns when a spec would fire, after the same checks a new schedule gets.
    pub fn preview(&self, query: &PreviewQuery) -> AppResult<Vec<DateTime<Utc>>> {
        let count = match query.count {
            0 => 10,
            n if n > MAX_PREVIEW => {
                return Err(ValidationError::invalid(
                    "count",
                    format!("at most {MAX_PREVIEW}, got {n}"),
                )
                .into());
            }
            n => n,
        };
        let rule = Recurrence::parse(&query.spec, &query.time_zone, query.missing_day)?;
        rule.check(query.from, self.min_interval)?;
        Ok(rule.preview(query.from, query.from, count as usize))
    }
}

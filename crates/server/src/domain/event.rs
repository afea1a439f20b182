//! Task events (one per state change, the log behind Subscribe) and the
//! filters subscribers choose them with.

use chrono::{DateTime, Utc};

use super::{TaskId, TaskState, ValidationError};

/// Most task ids one subscription may name.
pub const MAX_SUBSCRIBED_TASKS: usize = 1000;

/// One state change of one task, at its position in the event log.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskEvent {
    /// Position in the installation-wide log (the cursor).
    pub cursor: i64,
    /// The task.
    pub task_id: TaskId,
    /// Its recurring schedule, for occurrences.
    pub schedule_id: Option<TaskId>,
    /// Its queue.
    pub queue: String,
    /// The attempt the change is about, or the attempts made so far.
    pub attempt: u32,
    /// The new state.
    pub state: TaskState,
    /// When it happened.
    pub at: DateTime<Utc>,
    /// The worker, for attempt starts and ends.
    pub worker_id: String,
    /// Error text of a failed attempt.
    pub error: Option<String>,
}

/// Which events a subscriber wants: fields combine with AND, the values of
/// one list with OR; an empty field matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventFilter {
    /// Only these tasks.
    pub task_ids: Vec<TaskId>,
    /// Only occurrences of this schedule.
    pub schedule_id: Option<TaskId>,
    /// Only this queue.
    pub queue: Option<String>,
    /// Only changes to these states.
    pub states: Vec<TaskState>,
}

impl EventFilter {
    /// Tells whether `event` passes the filter.
    pub fn matches(&self, event: &TaskEvent) -> bool {
        (self.task_ids.is_empty() || self.task_ids.contains(&event.task_id))
            && (self.schedule_id.is_none() || self.schedule_id == event.schedule_id)
            && self.queue.as_ref().is_none_or(|q| *q == event.queue)
            && self.wants_state(event.state)
    }

    /// Tells whether changes to `state` pass the state part of the filter.
    pub fn wants_state(&self, state: TaskState) -> bool {
        self.states.is_empty() || self.states.contains(&state)
    }
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// Live events only.
    Now,
    /// Every retained event after this cursor, then live.
    After(i64),
    /// The whole retained history of the named tasks or schedule, then live.
    Beginning,
}

/// A validated subscription.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    /// Which events.
    pub filter: EventFilter,
    /// Where to start.
    pub start: StartAt,
}

impl Subscription {
    /// Refuses more task ids than one subscription may name.
    pub fn check_task_count(count: usize) -> Result<(), ValidationError> {
        if count > MAX_SUBSCRIBED_TASKS {
            return Err(ValidationError::invalid(
                "task_ids",
                format!("at most {MAX_SUBSCRIBED_TASKS} task ids, got {count}"),
            ));
        }
        Ok(())
    }

    /// Checks a subscription before anything is registered.
    pub fn new(filter: EventFilter, start: StartAt) -> Result<Self, ValidationError> {
        Self::check_task_count(filter.task_ids.len())?;
        if start == StartAt::Beginning && filter.task_ids.is_empty() && filter.schedule_id.is_none()
        {
            return Err(ValidationError::invalid(
                "from_beginning",
                "needs task_ids or schedule_id; use after_cursor to replay a queue or everything",
            ));
        }
        if let Some(queue) = &filter.queue
            && !kairos_proto::wire::is_valid_queue(queue)
        {
            return Err(ValidationError::invalid(
                "queue",
                "must be 1 to 64 of [A-Za-z0-9_-]",
            ));
        }
        Ok(Self { filter, start })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(queue: &str, state: TaskState) -> TaskEvent {
        TaskEvent {
            cursor: 1,
            task_id: TaskId::new(),
            schedule_id: None,
            queue: queue.into(),
            attempt: 0,
            state,
            at: Utc::now(),
            worker_id: String::new(),
            error: None,
        }
    }

    #[test]
    fn filters_combine_fields_with_and_and_values_with_or() {
        let e = event("billing", TaskState::Dead);
        assert!(EventFilter::default().matches(&e));
        let by_queue = EventFilter {
            queue: Some("billing".into()),
            states: vec![TaskState::Succeeded, TaskState::Dead],
            ..Default::default()
        };
        assert!(by_queue.matches(&e));
        let other_state = EventFilter {
            states: vec![TaskState::Succeeded],
            ..by_queue
        };
        assert!(!other_state.matches(&e));
        let by_schedule = EventFilter {
            schedule_id: Some(TaskId::new()),
            ..Default::default()
        };
        assert!(!by_schedule.matches(&e));
        let by_task = EventFilter {
            task_ids: vec![TaskId::new(), e.task_id],
            ..Default::default()
        };
        assert!(by_task.matches(&e));
    }

    #[test]
    fn from_beginning_needs_a_task_or_schedule() {
        let err = Subscription::new(EventFilter::default(), StartAt::Beginning).unwrap_err();
        assert_eq!(err.field, "from_beginning");
        let ok = Subscription::new(
            EventFilter {
                schedule_id: Some(TaskId::new()),
                ..Default::default()
            },
            StartAt::Beginning,
        );
        assert!(ok.is_ok());
    }
}

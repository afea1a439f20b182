//! How early the dispatcher must start releasing so that a large burst has
//! left before its instant.
//!
//! The release lead is fixed (2 s by default), and one dispatcher releases a
//! few tens of thousands of tasks a second. A burst of a million due at one
//! instant would mostly leave at the instant itself, where its release takes
//! the CPU its starts need. The backlog counts the dispatcher's waiting tasks
//! per slot of due time and plans, from the last slot back, the latest start
//! that still releases every slot a full lead before its due time at a
//! planning rate; the dispatcher releases in due order from then on.

use std::collections::BTreeMap;

/// Width of a slot of due time.
const SLOT_MS: i64 = 100;
/// The release rate the plan assumes, in tasks per millisecond. Bursts
/// release 50-75 thousand a second on two cores, about half that on a host
/// at half speed; starting too early costs only a longer wait in the queue's
/// ahead lane, starting too late leaves the rest for the instant.
const PLAN_PER_MS: i64 = 25;

/// Waiting tasks per slot of due time.
#[derive(Debug, Default)]
pub struct Backlog {
    slots: BTreeMap<i64, u32>,
}

impl Backlog {
    /// Counts a task due at `due_ms` that joined the dispatcher's timer.
    pub fn add(&mut self, due_ms: i64) {
        *self.slots.entry(slot_of(due_ms)).or_default() += 1;
    }

    /// Forgets a task due at `due_ms` that left the timer.
    pub fn remove(&mut self, due_ms: i64) {
        let slot = slot_of(due_ms);
        if let Some(count) = self.slots.get_mut(&slot) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.slots.remove(&slot);
            }
        }
    }

    /// Forgets every task.
    pub fn clear(&mut self) {
        self.slots.clear();
    }

    /// Plans the release at `now_ms` of the tasks due between `lead_ms` and
    /// `lead_ms + max_lead_ms` from then: each slot starts at the latest
    /// instant that still releases, in due order at the planning rate, every
    /// task `lead_ms` before its due time, and no earlier than `max_lead_ms`
    /// before that. Tasks due sooner are released by their own lead anyway.
    pub fn plan(&self, now_ms: i64, lead_ms: i64, max_lead_ms: i64) -> Plan {
        let first = slot_of(now_ms + lead_ms);
        let last = slot_of(now_ms + lead_ms + max_lead_ms);
        let mut plan = Plan {
            start_ms: i64::MAX,
            through_ms: i64::MIN,
        };
        for (&slot, &count) in self.slots.range(first..=last).rev() {
            let due_ms = slot * SLOT_MS;
            let needed_ms = (i64::from(count) + PLAN_PER_MS - 1) / PLAN_PER_MS;
            let done_by = (due_ms - lead_ms).min(plan.start_ms);
            plan.start_ms = (done_by - needed_ms).max(due_ms - lead_ms - max_lead_ms);
            if plan.start_ms <= now_ms && plan.through_ms == i64::MIN {
                plan.through_ms = due_ms + SLOT_MS;
            }
        }
        plan
    }
}

/// When tasks must leave ahead of their release lead, per [`Backlog::plan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// When the first slot's release starts; `i64::MAX` when nothing waits.
    /// Later slots start no earlier (the plan releases in due order).
    pub start_ms: i64,
    /// Tasks due before this must be released now; `i64::MIN` for none.
    pub through_ms: i64,
}

impl Plan {
    /// When the plan releases a task due at `due_ms`, seen at `now_ms`:
    /// now when its slot's start has come, the plan's start while that is
    /// ahead, otherwise `i64::MAX` (its own release lead decides).
    pub fn release_ms(&self, due_ms: i64, now_ms: i64) -> i64 {
        if due_ms < self.through_ms {
            now_ms
        } else if self.start_ms > now_ms {
            self.start_ms
        } else {
            i64::MAX
        }
    }
}

fn slot_of(due_ms: i64) -> i64 {
    due_ms.div_euclid(SLOT_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_000_000;
    const LEAD: i64 = 2_000;
    const MAX_LEAD: i64 = 30_000;

    fn backlog(tasks: &[(i64, u32)]) -> Backlog {
        let mut backlog = Backlog::default();
        for &(due_ms, n) in tasks {
            for _ in 0..n {
                backlog.add(due_ms);
            }
        }
        backlog
    }

    fn start(backlog: &Backlog) -> i64 {
        backlog.plan(NOW, LEAD, MAX_LEAD).start_ms
    }

    #[test]
    fn a_small_instant_starts_at_the_lead() {
        let due = NOW + 10_000;
        let one_ms = PLAN_PER_MS as u32;
        assert_eq!(start(&backlog(&[(due, one_ms)])), due - LEAD - 1);
        assert_eq!(start(&Backlog::default()), i64::MAX);
    }

    #[test]
    fn a_large_burst_starts_as_far_ahead_as_its_release_takes() {
        let due = NOW + 20_000;
        let start = start(&backlog(&[(due, 400_000)]));
        assert_eq!(start, due - LEAD - 400_000 / PLAN_PER_MS);
    }

    #[test]
    fn a_burst_larger_than_the_longest_lead_starts_at_it() {
        let due = NOW + 20_000;
        assert_eq!(start(&backlog(&[(due, 4_000_000)])), due - LEAD - MAX_LEAD);
    }

    #[test]
    fn tasks_due_before_a_burst_leave_before_it() {
        let burst = NOW + 20_000;
        // 40,000 due just before the burst need time of their own.
        let start = start(&backlog(&[(burst - 100, 40_000), (burst, 400_000)]));
        assert_eq!(
            start,
            burst - LEAD - 400_000 / PLAN_PER_MS - 40_000 / PLAN_PER_MS
        );
    }

    #[test]
    fn a_steady_flow_the_plan_keeps_up_with_starts_at_the_lead() {
        // 20,000 a second: 2,000 per slot, each released within its slot.
        let tasks: Vec<(i64, u32)> = (0..300)
            .map(|i| (NOW + 5_000 + i * SLOT_MS, 2_000))
            .collect();
        assert_eq!(
            start(&backlog(&tasks)),
            NOW + 5_000 - LEAD - 2_000 / PLAN_PER_MS
        );
    }

    #[test]
    fn a_burst_beyond_the_longest_lead_is_not_looked_at_yet() {
        let due = NOW + LEAD + MAX_LEAD + 5_000;
        assert_eq!(start(&backlog(&[(due, 4_000_000)])), i64::MAX);
    }

    #[test]
    fn released_tasks_no_longer_count() {
        let due = NOW + 20_000;
        let mut backlog = backlog(&[(due, 400_000)]);
        for _ in 0..360_000 {
            backlog.remove(due);
        }
        assert_eq!(start(&backlog), due - LEAD - 40_000 / PLAN_PER_MS);
        for _ in 0..40_001 {
            backlog.remove(due);
        }
        assert_eq!(start(&backlog), i64::MAX);
    }

    #[test]
    fn only_the_slots_whose_start_has_come_go_now() {
        let burst = NOW + 10_000;
        // The burst must leave now; a task after it waits for its own lead.
        let plan = backlog(&[(burst, 400_000), (burst + 5_000, 1)]).plan(NOW, LEAD, MAX_LEAD);
        assert_eq!(plan.release_ms(burst, NOW), NOW);
        assert_eq!(plan.release_ms(burst + 5_000, NOW), i64::MAX);
        // A late task pulls nothing due later along with it.
        let plan = backlog(&[(NOW - 5_000, 1), (NOW + 20_000, 1)]).plan(NOW, LEAD, MAX_LEAD);
        assert_eq!(plan.release_ms(NOW + 20_000, NOW), NOW + 20_000 - LEAD - 1);
        // Before a burst's start, the plan wakes the dispatcher then.
        let plan = backlog(&[(burst, 40_000)]).plan(NOW, LEAD, MAX_LEAD);
        assert_eq!(
            plan.release_ms(burst, NOW),
            burst - LEAD - 40_000 / PLAN_PER_MS
        );
    }
}

//! When a recurring schedule fires: a cron spec (5 fields, or 6 with seconds
//! first, parsed by croner) or a fixed interval, evaluated in an IANA zone.
//!
//! Cron times are wall-clock times in the zone, under Vixie cron's DST rules:
//! - a spec whose hour field does not start with `*` names fixed hours: a wall
//!   time in a spring-forward gap runs once, at the end of the gap; a wall
//!   time that happens twice (fall-back overlap) runs once, at the first;
//! - a spec whose hour field starts with `*` (`*`, `*/2`) follows elapsed
//!   time: wall times in a gap do not happen, and those in an overlap happen
//!   twice.
//!
//! When both day-of-month and day-of-week are restricted, a day matches if
//! either does (Vixie cron's OR). A day-of-month a month lacks (31 in April)
//! is skipped that month, or moved to the month's last day under
//! [`MissingDay::LastDay`]. Intervals are absolute time and ignore DST.

use std::time::Duration;

use chrono::{
    DateTime, Datelike, Days, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, Offset, TimeZone,
    Timelike, Utc,
};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

use super::ValidationError;

/// What a schedule does in a month that lacks its day of month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingDay {
    /// No occurrence that month.
    #[default]
    Skip,
    /// The occurrence moves to the month's last day.
    LastDay,
}

/// How many days ahead a search for the next fire time looks: leap days are
/// at most 8 years apart, so 11 years finds every spec that fires at all.
const SEARCH_DAYS: u64 = 11 * 366;

/// How many fire times the minimum-interval check looks at.
const INTERVAL_SAMPLE: usize = 200;

#[derive(Debug, Clone)]
enum Rule {
    Cron(Box<CronRule>),
    Every(chrono::TimeDelta),
}

#[derive(Debug, Clone)]
struct CronRule {
    cron: Cron,
    hours: Vec<u32>,
    minutes: Vec<u32>,
    seconds: Vec<u32>,
    /// Fixed hours (wall-clock DST rules) rather than a `*` hour field.
    fixed_hours: bool,
    /// Plain day-of-month values, for the missing-day policy.
    days_of_month: Vec<u32>,
    dom_wildcard: bool,
}

/// A parsed recurrence rule in its zone.
#[derive(Debug, Clone)]
pub struct Recurrence {
    rule: Rule,
    zone: Tz,
    missing_day: MissingDay,
}

impl Recurrence {
    /// Parses a spec (`every 90s`, a cron spec, or `@daily`-style shortcut) in
    /// `zone` (an IANA name; empty means UTC). Errors name the `spec` or
    /// `time_zone` field, and for cron the field and token at fault.
    pub fn parse(spec: &str, zone: &str, missing_day: MissingDay) -> Result<Self, ValidationError> {
        let zone: Tz = if zone.trim().is_empty() {
            Tz::UTC
        } else {
            zone.trim().parse().map_err(|_| {
                ValidationError::invalid(
                    "time_zone",
                    format!("unknown time zone `{zone}`; use an IANA name such as Asia/Seoul"),
                )
            })?
        };
        let spec = spec.trim();
        if spec.is_empty() {
            return Err(ValidationError::invalid(
                "spec",
                "empty; give a cron spec (5 fields, or 6 with seconds first), a shortcut such as @daily, or `every <duration>`",
            ));
        }
        let rule = match spec.split_once(char::is_whitespace) {
            Some((word, rest)) if word.eq_ignore_ascii_case("every") => {
                parse_interval(rest.trim())?
            }
            _ => parse_cron(spec)?,
        };
        Ok(Self {
            rule,
            zone,
            missing_day,
        })
    }

    /// Checks that the rule fires at all and never more often than `min_interval`,
    /// looking from `now`.
    pub fn check(&self, now: DateTime<Utc>, min_interval: Duration) -> Result<(), ValidationError> {
        let times = self.preview(now, now, INTERVAL_SAMPLE);
        if times.is_empty() {
            return Err(ValidationError::invalid(
                "spec",
                "never fires (no matching date in the next 11 years)",
            ));
        }
        let min = chrono::TimeDelta::from_std(min_interval).unwrap_or(chrono::TimeDelta::MAX);
        let too_close = match &self.rule {
            Rule::Every(step) => *step < min,
            Rule::Cron(_) => times.windows(2).any(|w| w[1] - w[0] < min),
        };
        if too_close {
            return Err(ValidationError::invalid(
                "spec",
                format!(
                    "fires more often than the minimum interval of {}",
                    humantime::format_duration(min_interval)
                ),
            ));
        }
        Ok(())
    }

    /// Returns up to `count` fire times strictly after `from`; interval rules
    /// count from `anchor` (the schedule's start).
    pub fn preview(
        &self,
        anchor: DateTime<Utc>,
        from: DateTime<Utc>,
        count: usize,
    ) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(count.min(1024));
        let mut t = from;
        while out.len() < count {
            let Some(next) = self.next_after(anchor, t) else {
                break;
            };
            out.push(next);
            t = next;
        }
        out
    }

    /// Returns the first fire time strictly after `t`; interval rules fire at
    /// `anchor + k × interval`, k ≥ 0.
    pub fn next_after(&self, anchor: DateTime<Utc>, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.rule {
            Rule::Every(step) => {
                if t < anchor {
                    return Some(anchor);
                }
                let step_ns = step.num_nanoseconds()?;
                let elapsed = (t - anchor).num_nanoseconds()?;
                let k = elapsed / step_ns + 1;
                anchor.checked_add_signed(chrono::TimeDelta::nanoseconds(k.checked_mul(step_ns)?))
            }
            Rule::Cron(rule) => self.next_cron(rule, t),
        }
    }

    fn next_cron(&self, rule: &CronRule, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if rule.fixed_hours {
            // Wall-clock rules map each wall time to one instant (the first of
            // an overlap, the end of a gap), and that mapping never goes back
            // in time: the first wall time after `t` that maps past `t` wins.
            let local_t = t.with_timezone(&self.zone).naive_local();
            return self.wall_times_from(rule, local_t).find_map(|wall| {
                self.instants(rule, wall)
                    .into_iter()
                    .flatten()
                    .find(|at| *at > t)
            });
        }
        // Elapsed-time rules: walk spans of constant UTC offset; inside one,
        // wall time is instant plus offset, so the first matching wall time of
        // the span is the answer. Wall times a gap skips belong to no span;
        // those an overlap repeats belong to two.
        let mut start = DateTime::from_timestamp(t.timestamp().checked_add(1)?, 0)?;
        let horizon = start + chrono::TimeDelta::days(SEARCH_DAYS as i64);
        while start < horizon {
            let offset = self.offset_at(start);
            let end = self.span_end(start, offset);
            let shift = chrono::TimeDelta::seconds(i64::from(offset));
            let wall = self
                .wall_times_from(rule, start.naive_utc() + shift)
                .next()?;
            if wall < end.naive_utc() + shift {
                return Some((wall - shift).and_utc());
            }
            start = end;
        }
        None
    }

    /// The zone's UTC offset at `t`, in seconds.
    fn offset_at(&self, t: DateTime<Utc>) -> i32 {
        self.zone
            .offset_from_utc_datetime(&t.naive_utc())
            .fix()
            .local_minus_utc()
    }

    /// The first whole second after `start` whose offset differs from
    /// `offset`, or a year on when there is none. Probes a day at a time
    /// (offsets last for weeks at least), then halves down to the second.
    fn span_end(&self, start: DateTime<Utc>, offset: i32) -> DateTime<Utc> {
        let day = chrono::TimeDelta::days(1);
        let mut low = start;
        for _ in 0..366 {
            let high = low + day;
            if self.offset_at(high) != offset {
                let mut high = high;
                while (high - low).num_seconds() > 1 {
                    let mid = low + chrono::TimeDelta::seconds((high - low).num_seconds() / 2);
                    if self.offset_at(mid) == offset {
                        low = mid;
                    } else {
                        high = mid;
                    }
                }
                return high;
            }
            low = high;
        }
        low
    }

    /// The instants a matching wall time fires at, under the DST rules.
    fn instants(&self, rule: &CronRule, wall: NaiveDateTime) -> [Option<DateTime<Utc>>; 2] {
        match self.zone.from_local_datetime(&wall) {
            LocalResult::Single(at) => [Some(at.with_timezone(&Utc)), None],
            LocalResult::Ambiguous(a, b) => {
                let (first, second) = if a <= b { (a, b) } else { (b, a) };
                let second = (!rule.fixed_hours).then(|| second.with_timezone(&Utc));
                [Some(first.with_timezone(&Utc)), second]
            }
            LocalResult::None if rule.fixed_hours => [self.gap_end(wall), None],
            LocalResult::None => [None, None],
        }
    }

    /// The instant a spring-forward gap containing `wall` ends (clocks jump
    /// on a minute boundary in every zone, so the first minute that exists).
    fn gap_end(&self, wall: NaiveDateTime) -> Option<DateTime<Utc>> {
        let mut minute = wall.with_second(0)?.with_nanosecond(0)?;
        for _ in 0..(24 * 60) {
            minute += chrono::TimeDelta::minutes(1);
            if let Some(at) = self.zone.from_local_datetime(&minute).earliest() {
                return Some(at.with_timezone(&Utc));
            }
        }
        None
    }

    /// Wall times matching the cron fields, ascending, from `start` on.
    fn wall_times_from<'a>(
        &'a self,
        rule: &'a CronRule,
        start: NaiveDateTime,
    ) -> impl Iterator<Item = NaiveDateTime> + 'a {
        let first_day = start.date();
        (0..SEARCH_DAYS)
            .filter_map(move |i| first_day.checked_add_days(Days::new(i)))
            .filter(move |day| self.day_matches(rule, *day))
            .flat_map(move |day| {
                let from = (day == first_day).then(|| start.time());
                times_of_day(rule, day, from)
            })
            .filter(move |wall| *wall >= start)
    }

    fn day_matches(&self, rule: &CronRule, day: NaiveDate) -> bool {
        let pattern = &rule.cron.pattern;
        let (year, month, dom) = (day.year(), day.month(), day.day());
        if !pattern.month_match(month).unwrap_or(false) {
            return false;
        }
        if pattern
            .day_match(year, month, dom, weekday(day))
            .unwrap_or(false)
        {
            return true;
        }
        // Billing days: the 31st (or 29th, 30th) of a month without it moves
        // to that month's last day.
        self.missing_day == MissingDay::LastDay
            && !rule.dom_wildcard
            && dom == last_day_of_month(year, month)
            && rule.days_of_month.iter().any(|&d| d > dom)
    }
}

/// Wall times of one day matching the time fields, ascending, from `from` on.
fn times_of_day(
    rule: &CronRule,
    day: NaiveDate,
    from: Option<NaiveTime>,
) -> impl Iterator<Item = NaiveDateTime> + '_ {
    let (fh, fm, fs) = from.map_or((0, 0, 0), |t| (t.hour(), t.minute(), t.second()));
    let bounded = from.is_some();
    rule.hours
        .iter()
        .copied()
        .filter(move |&h| h >= fh)
        .flat_map(move |h| {
            let min_m = if bounded && h == fh { fm } else { 0 };
            rule.minutes
                .iter()
                .copied()
                .filter(move |&m| m >= min_m)
                .flat_map(move |m| {
                    let min_s = if bounded && h == fh && m == fm { fs } else { 0 };
                    rule.seconds
                        .iter()
                        .copied()
                        .filter(move |&s| s >= min_s)
                        .filter_map(move |s| day.and_hms_opt(h, m, s))
                })
        })
}

fn weekday(day: NaiveDate) -> croner::Weekday {
    use croner::Weekday as W;
    match day.weekday() {
        chrono::Weekday::Mon => W::Monday,
        chrono::Weekday::Tue => W::Tuesday,
        chrono::Weekday::Wed => W::Wednesday,
        chrono::Weekday::Thu => W::Thursday,
        chrono::Weekday::Fri => W::Friday,
        chrono::Weekday::Sat => W::Saturday,
        chrono::Weekday::Sun => W::Sunday,
    }
}

fn last_day_of_month(year: i32, month: u32) -> u32 {
    let (y, m) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    NaiveDate::from_ymd_opt(y, m, 1)
        .and_then(|d| d.pred_opt())
        .map_or(28, |d| d.day())
}

fn parse_interval(text: &str) -> Result<Rule, ValidationError> {
    let step = humantime::parse_duration(text).map_err(|e| {
        ValidationError::invalid(
            "spec",
            format!("interval `{text}`: {e} (examples: every 90s, every 5m, every 1h 30m)"),
        )
    })?;
    if step.is_zero() {
        return Err(ValidationError::invalid(
            "spec",
            "interval must be positive",
        ));
    }
    let step = chrono::TimeDelta::from_std(step)
        .map_err(|_| ValidationError::invalid("spec", format!("interval `{text}` is too long")))?;
    Ok(Rule::Every(step))
}

const FIELDS_5: [&str; 5] = ["minute", "hour", "day-of-month", "month", "day-of-week"];
const FIELDS_6: [&str; 6] = [
    "second",
    "minute",
    "hour",
    "day-of-month",
    "month",
    "day-of-week",
];

fn parse_cron(spec: &str) -> Result<Rule, ValidationError> {
    let expanded = match spec.to_ascii_lowercase().as_str() {
        "@yearly" | "@annually" => "0 0 1 1 *",
        "@monthly" => "0 0 1 * *",
        "@weekly" => "0 0 * * 0",
        "@daily" | "@midnight" => "0 0 * * *",
        "@hourly" => "0 * * * *",
        other if other.starts_with('@') => {
            return Err(ValidationError::invalid(
                "spec",
                format!(
                    "unknown shortcut `{spec}`; use @hourly, @daily, @weekly, @monthly or @yearly"
                ),
            ));
        }
        _ => spec,
    };
    let fields: Vec<&str> = expanded.split_whitespace().collect();
    let names: &[&str] = match fields.len() {
        5 => &FIELDS_5,
        6 => &FIELDS_6,
        n => {
            return Err(ValidationError::invalid(
                "spec",
                format!(
                    "`{spec}` has {n} fields; a cron spec has 5 (minute hour day-of-month month \
                     day-of-week) or 6 (second first)"
                ),
            ));
        }
    };
    let parser = CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build();
    let cron = parser
        .parse(expanded)
        .map_err(|err| locate_error(&parser, spec, &fields, names, &err))?;
    let values =
        |c: &croner::CronComponent| c.values().into_iter().map(u32::from).collect::<Vec<_>>();
    let pattern = &cron.pattern;
    let hour_field = fields[fields.len() - 4];
    Ok(Rule::Cron(Box::new(CronRule {
        hours: values(&pattern.hours),
        minutes: values(&pattern.minutes),
        seconds: values(&pattern.seconds),
        fixed_hours: !hour_field.starts_with('*'),
        days_of_month: values(&pattern.days),
        dom_wildcard: pattern.is_dom_wildcard(),
        cron,
    })))
}

/// Names the field, and the token in it, that croner refused: each field is
/// parsed alone (the others `*`), then each of its comma-separated tokens.
fn locate_error(
    parser: &CronParser,
    spec: &str,
    fields: &[&str],
    names: &[&str],
    err: &croner::errors::CronError,
) -> ValidationError {
    let parses_alone = |i: usize, value: &str| {
        let mut probe = vec!["*"; fields.len()];
        probe[i] = value;
        parser.parse(&probe.join(" ")).is_ok()
    };
    for (i, field) in fields.iter().enumerate() {
        if parses_alone(i, field) {
            continue;
        }
        let token = field
            .split(',')
            .find(|t| !parses_alone(i, t))
            .unwrap_or(field);
        return ValidationError::invalid(
            "spec",
            format!(
                "{} field (#{}) `{field}`: `{token}` is not valid there",
                names[i],
                i + 1
            ),
        );
    }
    ValidationError::invalid("spec", format!("`{spec}`: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .expect("valid time")
            .with_timezone(&Utc)
    }

    #[test]
    fn every_second_follows_elapsed_time_through_a_fall_back() {
        let rule =
            Recurrence::parse("* * * * * *", "America/New_York", MissingDay::Skip).expect("valid");
        let from = utc("2026-11-01T01:59:58-04:00");
        let times = rule.preview(from, from, 3);
        assert_eq!(
            times,
            [
                utc("2026-11-01T05:59:59Z"),
                utc("2026-11-01T06:00:00Z"),
                utc("2026-11-01T06:00:01Z")
            ]
        );
        // An hour of seconds across the transition: every instant once, in order.
        let from = utc("2026-11-01T01:30:00-04:00");
        let times = rule.preview(from, from, 3600);
        assert_eq!(times.len(), 3600);
        assert!(
            times
                .windows(2)
                .all(|w| w[1] - w[0] == chrono::TimeDelta::seconds(1))
        );
    }

    #[test]
    fn fixed_seconds_in_a_gap_run_once_at_its_end() {
        let rule = Recurrence::parse("*/10 30 2 * * *", "America/New_York", MissingDay::Skip)
            .expect("valid");
        let from = utc("2026-03-08T00:00:00-05:00");
        let times = rule.preview(from, from, 2);
        assert_eq!(
            times,
            [
                utc("2026-03-08T03:00:00-04:00"),
                utc("2026-03-09T02:30:00-04:00")
            ]
        );
    }

    #[test]
    fn interval_counts_from_the_anchor() {
        let rule = Recurrence::parse("every 90s", "", MissingDay::Skip).expect("valid");
        let anchor = utc("2026-01-01T00:00:00Z");
        assert_eq!(
            rule.next_after(anchor, utc("2025-12-31T00:00:00Z")),
            Some(anchor)
        );
        assert_eq!(
            rule.next_after(anchor, utc("2026-01-01T00:01:30Z")),
            Some(utc("2026-01-01T00:03:00Z"))
        );
    }
}

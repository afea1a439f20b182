//! Recurring specs through `PreviewRecurring`: fire times in several zones,
//! across DST gaps and overlaps, leap days, `L`, `W`, `#`, and the missing-day
//! policies; and the errors a bad spec gets.
//!
//! The expected times were worked out by hand from the calendar and the zones'
//! published DST rules (New York: 2026-03-08 and 2026-11-01, 2027-03-14 and
//! 2027-11-07; Berlin: 2026-03-29 and 2026-10-25, 2027-03-28; Lord Howe,
//! a 30-minute shift: 2026-04-05 and 2026-10-04; Seoul: no DST), and each
//! local time and offset was checked against Python's `zoneinfo` (an
//! independent tz implementation). They are written as local times with their
//! offsets, so each can be read and checked against a calendar.

use chrono::{DateTime, Utc};
use kairos_client::MissingDay;
use kairos_tests::stack::client;
use kairos_tests::{Backend, Stack};

use MissingDay::{LastDay, Skip};

/// One preview: spec, zone, policy, from (RFC 3339), expected fire times.
type Vector = (
    &'static str,
    &'static str,
    MissingDay,
    &'static str,
    &'static [&'static str],
);

const VECTORS: &[Vector] = &[
    // Plain fields, steps, ranges, lists, names, shortcuts (UTC).
    (
        "*/15 * * * *",
        "UTC",
        Skip,
        "2026-01-01T00:00:00Z",
        &[
            "2026-01-01T00:15:00Z",
            "2026-01-01T00:30:00Z",
            "2026-01-01T00:45:00Z",
            "2026-01-01T01:00:00Z",
        ],
    ),
    (
        "0 8-18/5 * * *",
        "UTC",
        Skip,
        "2026-01-01T00:00:00Z",
        &[
            "2026-01-01T08:00:00Z",
            "2026-01-01T13:00:00Z",
            "2026-01-01T18:00:00Z",
            "2026-01-02T08:00:00Z",
        ],
    ),
    (
        "0 0 1 JAN,JUL *",
        "UTC",
        Skip,
        "2026-02-01T00:00:00Z",
        &[
            "2026-07-01T00:00:00Z",
            "2027-01-01T00:00:00Z",
            "2027-07-01T00:00:00Z",
        ],
    ),
    (
        "0 0 1 * *",
        "UTC",
        Skip,
        "2026-01-15T00:00:00Z",
        &[
            "2026-02-01T00:00:00Z",
            "2026-03-01T00:00:00Z",
            "2026-04-01T00:00:00Z",
        ],
    ),
    (
        "@yearly",
        "UTC",
        Skip,
        "2026-06-01T00:00:00Z",
        &["2027-01-01T00:00:00Z", "2028-01-01T00:00:00Z"],
    ),
    (
        "@monthly",
        "UTC",
        Skip,
        "2026-12-15T00:00:00Z",
        &["2027-01-01T00:00:00Z", "2027-02-01T00:00:00Z"],
    ),
    // 2026-01-01 is a Thursday: the next Sundays are the 4th and the 11th.
    (
        "@weekly",
        "UTC",
        Skip,
        "2026-01-01T00:00:00Z",
        &["2026-01-04T00:00:00Z", "2026-01-11T00:00:00Z"],
    ),
    (
        "@hourly",
        "UTC",
        Skip,
        "2026-01-01T00:30:00Z",
        &["2026-01-01T01:00:00Z", "2026-01-01T02:00:00Z"],
    ),
    (
        "@daily",
        "Asia/Seoul",
        Skip,
        "2026-01-01T00:00:00Z",
        &["2026-01-02T00:00:00+09:00", "2026-01-03T00:00:00+09:00"],
    ),
    // Six fields: seconds first.
    (
        "30 0 12 * * *",
        "UTC",
        Skip,
        "2026-01-01T00:00:00Z",
        &["2026-01-01T12:00:30Z", "2026-01-02T12:00:30Z"],
    ),
    (
        "*/20 * * * * *",
        "UTC",
        Skip,
        "2026-01-01T00:00:00Z",
        &[
            "2026-01-01T00:00:20Z",
            "2026-01-01T00:00:40Z",
            "2026-01-01T00:01:00Z",
        ],
    ),
    // Seoul reminder: 2026-11-27 is a Friday; from its 09:00 (excluded), the
    // next Mondays and Fridays.
    (
        "0 9 * * MON,FRI",
        "Asia/Seoul",
        Skip,
        "2026-11-27T09:00:00+09:00",
        &[
            "2026-11-30T09:00:00+09:00",
            "2026-12-04T09:00:00+09:00",
            "2026-12-07T09:00:00+09:00",
            "2026-12-11T09:00:00+09:00",
        ],
    ),
    // Weekdays across the new year: Thu 2026-12-31 09:00 is excluded.
    (
        "0 9 * * MON-FRI",
        "Asia/Seoul",
        Skip,
        "2026-12-31T09:00:00+09:00",
        &[
            "2027-01-01T09:00:00+09:00",
            "2027-01-04T09:00:00+09:00",
            "2027-01-05T09:00:00+09:00",
        ],
    ),
    // L: last day of the month; February 2028 has 29 days.
    (
        "0 12 L * *",
        "UTC",
        Skip,
        "2026-01-01T00:00:00Z",
        &[
            "2026-01-31T12:00:00Z",
            "2026-02-28T12:00:00Z",
            "2026-03-31T12:00:00Z",
            "2026-04-30T12:00:00Z",
        ],
    ),
    (
        "0 12 L 2 *",
        "UTC",
        Skip,
        "2027-03-01T00:00:00Z",
        &["2028-02-29T12:00:00Z", "2029-02-28T12:00:00Z"],
    ),
    // Feb 29 only in leap years.
    (
        "0 0 29 2 *",
        "UTC",
        Skip,
        "2026-01-01T00:00:00Z",
        &["2028-02-29T00:00:00Z", "2032-02-29T00:00:00Z"],
    ),
    // 5L: the last Friday (January 30, February 27, March 27 in 2026).
    (
        "0 10 * * 5L",
        "UTC",
        Skip,
        "2026-01-01T00:00:00Z",
        &[
            "2026-01-30T10:00:00Z",
            "2026-02-27T10:00:00Z",
            "2026-03-27T10:00:00Z",
        ],
    ),
    // #: the second Monday (January 12, February 9, March 9 in 2026).
    (
        "0 9 * * MON#2",
        "UTC",
        Skip,
        "2026-01-01T00:00:00Z",
        &[
            "2026-01-12T09:00:00Z",
            "2026-02-09T09:00:00Z",
            "2026-03-09T09:00:00Z",
        ],
    ),
    (
        "0 9 * * 1#1",
        "UTC",
        Skip,
        "2026-01-01T00:00:00Z",
        &[
            "2026-01-05T09:00:00Z",
            "2026-02-02T09:00:00Z",
            "2026-03-02T09:00:00Z",
        ],
    ),
    // W: the weekday nearest the 15th (Thu Jan 15; Sun Feb 15 -> Mon 16;
    // Sun Mar 15 -> Mon 16).
    (
        "0 9 15W * *",
        "UTC",
        Skip,
        "2026-01-01T00:00:00Z",
        &[
            "2026-01-15T09:00:00Z",
            "2026-02-16T09:00:00Z",
            "2026-03-16T09:00:00Z",
        ],
    ),
    // 1W when the 1st is a Saturday (August 2026): Monday the 3rd, never the
    // previous month.
    (
        "0 9 1W 8 *",
        "UTC",
        Skip,
        "2026-01-01T00:00:00Z",
        &["2026-08-03T09:00:00Z", "2027-08-02T09:00:00Z"],
    ),
    // Day of month and day of week both restricted: either matches (Vixie OR).
    (
        "0 0 13 * FRI",
        "UTC",
        Skip,
        "2026-01-01T00:00:00Z",
        &[
            "2026-01-02T00:00:00Z",
            "2026-01-09T00:00:00Z",
            "2026-01-13T00:00:00Z",
            "2026-01-16T00:00:00Z",
        ],
    ),
    // Day 31, both policies.
    (
        "0 0 31 * *",
        "UTC",
        Skip,
        "2026-01-01T00:00:00Z",
        &[
            "2026-01-31T00:00:00Z",
            "2026-03-31T00:00:00Z",
            "2026-05-31T00:00:00Z",
            "2026-07-31T00:00:00Z",
        ],
    ),
    (
        "0 0 31 * *",
        "UTC",
        LastDay,
        "2026-01-01T00:00:00Z",
        &[
            "2026-01-31T00:00:00Z",
            "2026-02-28T00:00:00Z",
            "2026-03-31T00:00:00Z",
            "2026-04-30T00:00:00Z",
            "2026-05-31T00:00:00Z",
            "2026-06-30T00:00:00Z",
        ],
    ),
    (
        "0 0 30 * *",
        "UTC",
        LastDay,
        "2028-01-15T00:00:00Z",
        &[
            "2028-01-30T00:00:00Z",
            "2028-02-29T00:00:00Z",
            "2028-03-30T00:00:00Z",
        ],
    ),
    (
        "0 0 29 * *",
        "UTC",
        Skip,
        "2027-01-15T00:00:00Z",
        &["2027-01-29T00:00:00Z", "2027-03-29T00:00:00Z"],
    ),
    (
        "0 0 29 * *",
        "UTC",
        LastDay,
        "2027-01-15T00:00:00Z",
        &[
            "2027-01-29T00:00:00Z",
            "2027-02-28T00:00:00Z",
            "2027-03-29T00:00:00Z",
        ],
    ),
    (
        "0 0 30 2 *",
        "UTC",
        LastDay,
        "2026-01-01T00:00:00Z",
        &[
            "2026-02-28T00:00:00Z",
            "2027-02-28T00:00:00Z",
            "2028-02-29T00:00:00Z",
        ],
    ),
    // New York, spring forward 2026-03-08 02:00 EST -> 03:00 EDT.
    // Fixed hours: 02:30 does not exist; it runs once at the end of the gap.
    (
        "30 2 * * *",
        "America/New_York",
        Skip,
        "2026-03-07T00:00:00-05:00",
        &[
            "2026-03-07T02:30:00-05:00",
            "2026-03-08T03:00:00-04:00",
            "2026-03-09T02:30:00-04:00",
        ],
    ),
    // Two fixed times in the gap still run once.
    (
        "0,30 2 * * *",
        "America/New_York",
        Skip,
        "2026-03-08T00:00:00-05:00",
        &[
            "2026-03-08T03:00:00-04:00",
            "2026-03-09T02:00:00-04:00",
            "2026-03-09T02:30:00-04:00",
        ],
    ),
    // `*` hours follow elapsed time: 02:30 is skipped.
    (
        "30 * * * *",
        "America/New_York",
        Skip,
        "2026-03-08T00:00:00-05:00",
        &[
            "2026-03-08T00:30:00-05:00",
            "2026-03-08T01:30:00-05:00",
            "2026-03-08T03:30:00-04:00",
            "2026-03-08T04:30:00-04:00",
        ],
    ),
    (
        "0 */2 * * *",
        "America/New_York",
        Skip,
        "2026-03-08T00:00:00-05:00",
        &["2026-03-08T04:00:00-04:00", "2026-03-08T06:00:00-04:00"],
    ),
    // New York, fall back 2026-11-01 02:00 EDT -> 01:00 EST.
    // Fixed hours: 01:30 happens twice; it runs at the first.
    (
        "30 1 * * *",
        "America/New_York",
        Skip,
        "2026-10-31T00:00:00-04:00",
        &[
            "2026-10-31T01:30:00-04:00",
            "2026-11-01T01:30:00-04:00",
            "2026-11-02T01:30:00-05:00",
        ],
    ),
    // Every minute of hour 1 is still fixed hours: once each, in the first pass.
    (
        "* 1 * * *",
        "America/New_York",
        Skip,
        "2026-11-01T01:58:00-04:00",
        &["2026-11-01T01:59:00-04:00", "2026-11-02T01:00:00-05:00"],
    ),
    // `*` hours: 01:30 runs in both passes.
    (
        "30 * * * *",
        "America/New_York",
        Skip,
        "2026-11-01T00:00:00-04:00",
        &[
            "2026-11-01T00:30:00-04:00",
            "2026-11-01T01:30:00-04:00",
            "2026-11-01T01:30:00-05:00",
            "2026-11-01T02:30:00-05:00",
        ],
    ),
    (
        "0 */2 * * *",
        "America/New_York",
        Skip,
        "2026-11-01T00:00:00-04:00",
        &["2026-11-01T02:00:00-05:00", "2026-11-01T04:00:00-05:00"],
    ),
    // New York 2027: fall back on Sunday 2027-11-07.
    (
        "30 1 * * SUN",
        "America/New_York",
        Skip,
        "2027-11-01T00:00:00-04:00",
        &["2027-11-07T01:30:00-04:00", "2027-11-14T01:30:00-05:00"],
    ),
    // Berlin, spring forward 2026-03-29 02:00 CET -> 03:00 CEST.
    (
        "30 2 * * *",
        "Europe/Berlin",
        Skip,
        "2026-03-28T00:00:00+01:00",
        &[
            "2026-03-28T02:30:00+01:00",
            "2026-03-29T03:00:00+02:00",
            "2026-03-30T02:30:00+02:00",
        ],
    ),
    // Berlin, fall back 2026-10-25 03:00 CEST -> 02:00 CET.
    (
        "30 2 * * *",
        "Europe/Berlin",
        Skip,
        "2026-10-24T12:00:00+02:00",
        &["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"],
    ),
    (
        "0 * * * *",
        "Europe/Berlin",
        Skip,
        "2026-10-25T01:30:00+02:00",
        &[
            "2026-10-25T02:00:00+02:00",
            "2026-10-25T02:00:00+01:00",
            "2026-10-25T03:00:00+01:00",
        ],
    ),
    // Berlin 2027: spring forward on 2027-03-28.
    (
        "15 2 * * *",
        "Europe/Berlin",
        Skip,
        "2027-03-27T12:00:00+01:00",
        &["2027-03-28T03:00:00+02:00", "2027-03-29T02:15:00+02:00"],
    ),
    // Lord Howe: +10:30 standard, +11:00 summer. Spring forward 2026-10-04
    // 02:00 -> 02:30 (a 30-minute gap).
    (
        "15 2 * * *",
        "Australia/Lord_Howe",
        Skip,
        "2026-10-03T12:00:00+10:30",
        &["2026-10-04T02:30:00+11:00", "2026-10-05T02:15:00+11:00"],
    ),
    (
        "15 * * * *",
        "Australia/Lord_Howe",
        Skip,
        "2026-10-04T01:00:00+10:30",
        &["2026-10-04T01:15:00+10:30", "2026-10-04T03:15:00+11:00"],
    ),
    // Fall back 2026-04-05 02:00 -> 01:30 (01:30 to 02:00 happens twice).
    (
        "45 1 * * *",
        "Australia/Lord_Howe",
        Skip,
        "2026-04-04T12:00:00+11:00",
        &["2026-04-05T01:45:00+11:00", "2026-04-06T01:45:00+10:30"],
    ),
    (
        "45 * * * *",
        "Australia/Lord_Howe",
        Skip,
        "2026-04-05T01:00:00+11:00",
        &[
            "2026-04-05T01:45:00+11:00",
            "2026-04-05T01:45:00+10:30",
            "2026-04-05T02:45:00+10:30",
        ],
    ),
    // Intervals are absolute time: DST changes nothing.
    (
        "every 90s",
        "UTC",
        Skip,
        "2026-01-01T00:00:00Z",
        &[
            "2026-01-01T00:01:30Z",
            "2026-01-01T00:03:00Z",
            "2026-01-01T00:04:30Z",
        ],
    ),
    (
        "every 1h",
        "America/New_York",
        Skip,
        "2026-03-08T01:00:00-05:00",
        &["2026-03-08T03:00:00-04:00", "2026-03-08T04:00:00-04:00"],
    ),
    (
        "every 1h 30m",
        "Europe/Berlin",
        Skip,
        "2026-10-25T01:30:00+02:00",
        &["2026-10-25T02:00:00+01:00", "2026-10-25T03:30:00+01:00"],
    ),
];

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("bad vector time {text}: {e}"))
        .with_timezone(&Utc)
}

/// Every vector through the public API, as a user (or grpcurl) would call it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_matches_hand_checked_vectors() {
    assert!(VECTORS.len() >= 40, "the issue asks for at least 40 specs");
    let stack = Stack::start(Backend::Sqlite).await;
    let server = stack.server().await;
    let mut client = client(&server).await;
    let mut failures = Vec::new();
    for (spec, zone, policy, from, expected) in VECTORS {
        let expected: Vec<DateTime<Utc>> = expected.iter().map(|t| at(t)).collect();
        let got = client
            .preview_recurring(spec, zone, Some(at(from)), expected.len() as u32, *policy)
            .await
            .unwrap_or_else(|e| panic!("`{spec}` in {zone}: {e}"));
        if got != expected {
            failures.push(format!(
                "`{spec}` {zone} {policy:?} from {from}:\n  expected {expected:?}\n  got      {got:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The billing example: the 31st, or the month's last day, 09:00 in Seoul,
/// over a whole year.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_on_the_31st_or_last_day_over_a_year() {
    let stack = Stack::start(Backend::Sqlite).await;
    let server = stack.server().await;
    let mut client = client(&server).await;
    let got = client
        .preview_recurring(
            "0 9 31 * *",
            "Asia/Seoul",
            Some(at("2026-01-01T00:00:00+09:00")),
            12,
            LastDay,
        )
        .await
        .expect("preview");
    let days = [
        "01-31", "02-28", "03-31", "04-30", "05-31", "06-30", "07-31", "08-31", "09-30", "10-31",
        "11-30", "12-31",
    ];
    let expected: Vec<DateTime<Utc>> = days
        .iter()
        .map(|d| at(&format!("2026-{d}T09:00:00+09:00")))
        .collect();
    assert_eq!(got, expected);
    // Without the policy, the seven 31-day months only.
    let skipped = client
        .preview_recurring(
            "0 9 31 * *",
            "Asia/Seoul",
            Some(at("2026-01-01T00:00:00+09:00")),
            7,
            Skip,
        )
        .await
        .expect("preview");
    let months: Vec<String> = skipped
        .iter()
        .map(|t| {
            t.with_timezone(&chrono_tz::Asia::Seoul)
                .format("%m-%d")
                .to_string()
        })
        .collect();
    assert_eq!(
        months,
        [
            "01-31", "03-31", "05-31", "07-31", "08-31", "10-31", "12-31"
        ]
    );
}

/// Bad specs get INVALID_ARGUMENT naming the field and, for cron, the part at fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_specs_are_rejected_with_the_reason() {
    let stack = Stack::start(Backend::Sqlite).await;
    let mut config = stack.config();
    config.min_recurrence_interval = std::time::Duration::from_secs(1);
    let server = stack.server_with(config).await;
    let mut client = client(&server).await;
    let from = Some(at("2026-01-01T00:00:00Z"));
    let cases: &[(&str, &str, u32, &str, &str)] = &[
        ("61 * * * *", "UTC", 5, "spec", "minute field"),
        ("* * * * MON#6", "UTC", 5, "spec", "day-of-week field"),
        ("0 0 32 * *", "UTC", 5, "spec", "day-of-month field"),
        ("0 0 * * * * *", "UTC", 5, "spec", "7 fields"),
        ("0 0 30 2 *", "UTC", 5, "spec", "never fires"),
        ("@fortnightly", "UTC", 5, "spec", "unknown shortcut"),
        ("every 0s", "UTC", 5, "spec", "positive"),
        ("every 500ms", "UTC", 5, "spec", "minimum interval"),
        ("every soon", "UTC", 5, "spec", "interval"),
        ("", "UTC", 5, "spec", "empty"),
        (
            "0 9 * * *",
            "Mars/Olympus_Mons",
            5,
            "time_zone",
            "unknown time zone",
        ),
        ("0 9 * * *", "UTC", 1001, "count", "at most 1000"),
    ];
    for (spec, zone, count, field, words) in cases {
        let err = client
            .preview_recurring(spec, zone, from, *count, Skip)
            .await
            .expect_err(&format!("`{spec}` in {zone} must be refused"));
        assert_eq!(err.code, tonic::Code::InvalidArgument, "`{spec}`: {err}");
        assert_eq!(err.field.as_deref(), Some(*field), "`{spec}`: {err}");
        assert!(
            err.message.contains(words),
            "`{spec}`: `{}` should mention `{words}`",
            err.message
        );
    }
}

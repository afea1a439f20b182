//! `kairos recurring …`: create, preview, list, get, pause, resume, delete.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use clap::Subcommand;
use kairos_client::{CatchUp, Client, MissingDay, NewRecurring, Overlap, Recurring};
use serde_json::json;

/// Recurring-schedule commands.
#[derive(Debug, Subcommand)]
pub(crate) enum RecurringCommand {
    /// Create a schedule; each fire time becomes a task.
    Create {
        /// Queue of every occurrence.
        #[arg(long, default_value = "default")]
        queue: String,
        /// Cron spec (5 fields, or 6 with seconds first; L, W, #; @daily ...) or `every 90s`.
        #[arg(long = "cron", alias = "spec")]
        spec: String,
        /// IANA time zone the spec is read in.
        #[arg(long, default_value = "UTC")]
        tz: String,
        /// Payload text of every occurrence.
        #[arg(long, conflicts_with = "payload_file")]
        payload: Option<String>,
        /// File whose bytes are the payload.
        #[arg(long)]
        payload_file: Option<PathBuf>,
        /// Missed fire times (Kairos down, or paused): skip, one, all.
        #[arg(long, default_value = "skip", value_parser = parse_catch_up)]
        catch_up: CatchUp,
        /// A day of month the month lacks: skip that month, or use its last day.
        #[arg(long, default_value = "skip", value_parser = parse_missing_day)]
        missing_day: MissingDay,
        /// An occurrence due while the previous one runs: allow, or skip it.
        #[arg(long, default_value = "allow", value_parser = parse_overlap)]
        overlap: Overlap,
        /// No fire time before this (RFC 3339).
        #[arg(long)]
        start: Option<DateTime<Utc>>,
        /// No fire time after this (RFC 3339).
        #[arg(long)]
        end: Option<DateTime<Utc>>,
        /// Stop after this many occurrences.
        #[arg(long)]
        max_occurrences: Option<u32>,
        /// Delay each occurrence by up to this much (e.g. 30s).
        #[arg(long, value_parser = humantime::parse_duration)]
        jitter: Option<Duration>,
        /// Attempts of each occurrence.
        #[arg(long)]
        max_attempts: Option<u32>,
        /// Idempotency key.
        #[arg(long)]
        key: Option<String>,
    },
    /// Change a schedule from its next fire time not yet booked; only the options given change.
    Update {
        /// Schedule id.
        id: String,
        /// New cron spec or `every <duration>`.
        #[arg(long = "cron", alias = "spec")]
        spec: Option<String>,
        /// New IANA time zone.
        #[arg(long)]
        tz: Option<String>,
        /// New payload text.
        #[arg(long)]
        payload: Option<String>,
        /// New catch-up policy: skip, one, all.
        #[arg(long, value_parser = parse_catch_up)]
        catch_up: Option<CatchUp>,
        /// New missing-day policy: skip or last.
        #[arg(long, value_parser = parse_missing_day)]
        missing_day: Option<MissingDay>,
        /// New end (RFC 3339).
        #[arg(long)]
        end: Option<DateTime<Utc>>,
        /// New occurrence limit (0 for none).
        #[arg(long)]
        max_occurrences: Option<u32>,
        /// New jitter (e.g. 30s).
        #[arg(long, value_parser = humantime::parse_duration)]
        jitter: Option<Duration>,
        /// New attempts per occurrence.
        #[arg(long)]
        max_attempts: Option<u32>,
    },
    /// Show when a spec would fire, storing nothing.
    Preview {
        /// Cron spec or `every 90s`.
        spec: String,
        /// IANA time zone the spec is read in.
        #[arg(long, default_value = "UTC")]
        tz: String,
        /// How many fire times.
        #[arg(long, default_value_t = 10)]
        count: u32,
        /// Fire times after this instant (RFC 3339); now by default.
        #[arg(long)]
        from: Option<DateTime<Utc>>,
        /// A day of month the month lacks: skip that month, or use its last day.
        #[arg(long, default_value = "skip", value_parser = parse_missing_day)]
        missing_day: MissingDay,
    },
    /// List schedules, newest first.
    List {
        /// Only this queue.
        #[arg(long)]
        queue: Option<String>,
        /// Only paused (true) or running (false) schedules.
        #[arg(long)]
        paused: Option<bool>,
        /// Page size.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Page token from a previous listing.
        #[arg(long)]
        page_token: Option<String>,
    },
    /// Show a schedule and its next fire times.
    Get {
        /// Schedule id.
        id: String,
    },
    /// Stop new occurrences.
    Pause {
        /// Schedule id.
        id: String,
    },
    /// Continue from now, under the catch-up policy.
    Resume {
        /// Schedule id.
        id: String,
    },
    /// Delete a schedule.
    Delete {
        /// Schedule id.
        id: String,
        /// Also cancel its occurrences that have not started.
        #[arg(long)]
        cancel_pending: bool,
    },
}

fn parse_missing_day(s: &str) -> Result<MissingDay, String> {
    match s {
        "skip" => Ok(MissingDay::Skip),
        "last" | "last-day" => Ok(MissingDay::LastDay),
        _ => Err(format!("`{s}`: use skip or last")),
    }
}

fn parse_overlap(s: &str) -> Result<Overlap, String> {
    match s {
        "allow" => Ok(Overlap::Allow),
        "skip" => Ok(Overlap::Skip),
        _ => Err(format!("`{s}`: use allow or skip")),
    }
}

fn parse_catch_up(s: &str) -> Result<CatchUp, String> {
    match s {
        "skip" => Ok(CatchUp::Skip),
        "one" => Ok(CatchUp::One),
        "all" => Ok(CatchUp::All),
        _ => Err(format!("`{s}`: use skip, one or all")),
    }
}

fn schedule_json(s: &Recurring) -> serde_json::Value {
    json!({
        "id": s.id,
        "queue": s.queue,
        "spec": s.spec,
        "time_zone": s.time_zone,
        "paused": s.paused,
        "occurrences": s.occurrences,
        "next_fire_times": s.next_fire_times.iter().map(DateTime::to_rfc3339).collect::<Vec<_>>(),
        "created_at": s.created_at.to_rfc3339(),
    })
}

fn schedule_line(s: &Recurring) -> String {
    let next = s
        .next_fire_times
        .first()
        .map_or("finished".to_owned(), |t| {
            format!(
                "next {}",
                t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            )
        });
    format!(
        "{}  {:<12}  {:<20}  {:<16}  {}  {} made{}",
        s.id,
        s.queue,
        s.spec,
        s.time_zone,
        next,
        s.occurrences,
        if s.paused { "  PAUSED" } else { "" }
    )
}

fn print_schedule(s: &Recurring, json: bool, verb: &str) {
    if json {
        println!("{}", schedule_json(s));
    } else {
        println!("{verb}{}", schedule_line(s));
    }
}

/// Runs one recurring-schedule command.
pub(crate) async fn run(
    client: &mut Client,
    command: RecurringCommand,
    json: bool,
) -> anyhow::Result<()> {
    match command {
        RecurringCommand::Create {
            queue,
            spec,
            tz,
            payload,
            payload_file,
            catch_up,
            missing_day,
            overlap,
            start,
            end,
            max_occurrences,
            jitter,
            max_attempts,
            key,
        } => {
            let mut new = NewRecurring::new(queue, spec)
                .time_zone(tz)
                .catch_up(catch_up)
                .missing_day(missing_day)
                .overlap(overlap);
            if let Some(text) = payload {
                new = new.payload(text);
            }
            if let Some(path) = payload_file {
                let bytes = std::fs::read(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                new = new.payload(bytes);
            }
            if let Some(at) = start {
                new = new.start_at(at);
            }
            if let Some(at) = end {
                new = new.end_at(at);
            }
            if let Some(n) = max_occurrences {
                new = new.max_occurrences(n);
            }
            if let Some(d) = jitter {
                new = new.jitter(d);
            }
            if let Some(n) = max_attempts {
                new = new.max_attempts(n);
            }
            if let Some(key) = key {
                new = new.idempotency_key(key);
            }
            let schedule = client.create_recurring(new).await?;
            print_schedule(&schedule, json, "created ");
        }
        RecurringCommand::Update {
            id,
            spec,
            tz,
            payload,
            catch_up,
            missing_day,
            end,
            max_occurrences,
            jitter,
            max_attempts,
        } => {
            let mut changes = NewRecurring::default();
            let mut fields = Vec::new();
            if let Some(spec) = spec {
                changes.spec = spec;
                fields.push("spec");
            }
            if let Some(tz) = tz {
                changes.time_zone = tz;
                fields.push("time_zone");
            }
            if let Some(text) = payload {
                changes.payload = text.into();
                fields.push("payload");
            }
            if let Some(policy) = catch_up {
                changes.catch_up = policy;
                fields.push("catch_up");
            }
            if let Some(policy) = missing_day {
                changes.missing_day = policy;
                fields.push("missing_day");
            }
            if let Some(at) = end {
                changes.end_at = Some(at);
                fields.push("end_at");
            }
            if let Some(n) = max_occurrences {
                changes.max_occurrences = n;
                fields.push("max_occurrences");
            }
            if let Some(d) = jitter {
                changes.jitter = d;
                fields.push("jitter");
            }
            if let Some(n) = max_attempts {
                changes.max_attempts = Some(n);
                fields.push("max_attempts");
            }
            anyhow::ensure!(!fields.is_empty(), "give at least one option to change");
            let schedule = client.update_recurring(&id, changes, &fields).await?;
            print_schedule(&schedule, json, "updated ");
        }
        RecurringCommand::Preview {
            spec,
            tz,
            count,
            from,
            missing_day,
        } => {
            let times = client
                .preview_recurring(&spec, &tz, from, count, missing_day)
                .await?;
            let zone: chrono_tz::Tz = tz.parse().unwrap_or(chrono_tz::Tz::UTC);
            if json {
                let times: Vec<String> = times.iter().map(DateTime::to_rfc3339).collect();
                println!("{}", json!({ "fire_times": times }));
            } else {
                for t in &times {
                    println!(
                        "{}  {}",
                        t.with_timezone(&zone).format("%a %Y-%m-%d %H:%M:%S %Z"),
                        t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                    );
                }
            }
        }
        RecurringCommand::List {
            queue,
            paused,
            limit,
            page_token,
        } => {
            let (schedules, next) = client
                .list_recurring(queue.as_deref(), paused, limit, page_token.as_deref())
                .await?;
            if json {
                println!(
                    "{}",
                    json!({
                        "schedules": schedules.iter().map(schedule_json).collect::<Vec<_>>(),
                        "next_page_token": next,
                    })
                );
            } else {
                for s in &schedules {
                    println!("{}", schedule_line(s));
                }
                if let Some(token) = next {
                    println!("more: --page-token {token}");
                }
            }
        }
        RecurringCommand::Get { id } => {
            let schedule = client.get_recurring(&id).await?;
            if json {
                println!("{}", schedule_json(&schedule));
            } else {
                println!("{}", schedule_line(&schedule));
                for t in &schedule.next_fire_times {
                    println!(
                        "  fires {}",
                        t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                    );
                }
            }
        }
        RecurringCommand::Pause { id } => {
            let schedule = client.pause_recurring(&id).await?;
            print_schedule(&schedule, json, "paused ");
        }
        RecurringCommand::Resume { id } => {
            let schedule = client.resume_recurring(&id).await?;
            print_schedule(&schedule, json, "resumed ");
        }
        RecurringCommand::Delete { id, cancel_pending } => {
            let cancelled = client.delete_recurring(&id, cancel_pending).await?;
            if json {
                println!("{}", json!({ "deleted": id, "cancelled": cancelled }));
            } else {
                println!("deleted {id}; {cancelled} pending occurrences cancelled");
            }
        }
    }
    Ok(())
}

//! `kairos queue …`: create, update, get, list, pause, resume.

use std::time::Duration;

use clap::Subcommand;
use kairos_client::{Client, Queue, QueueChange, QueueStats};
use serde_json::json;

/// Settings flags shared by `create` and `update`: only those given are set.
#[derive(Debug, clap::Args)]
pub(crate) struct SettingsArgs {
    /// Most tasks running at once across every worker (0 for no limit).
    #[arg(long)]
    max_concurrency: Option<u32>,
    /// Attempts per task booked without its own.
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Delay before the second attempt (e.g. 1s).
    #[arg(long, value_parser = humantime::parse_duration)]
    initial_backoff: Option<Duration>,
    /// Longest delay between attempts (e.g. 5m).
    #[arg(long, value_parser = humantime::parse_duration)]
    max_backoff: Option<Duration>,
    /// Growth of the delay per attempt (1 to 10).
    #[arg(long)]
    multiplier: Option<f64>,
    /// Random variation of each delay, as a fraction either way (0 to 1).
    #[arg(long)]
    jitter: Option<f64>,
    /// Redelivery after this long without a sign of life (e.g. 30s).
    #[arg(long, value_parser = humantime::parse_duration)]
    run_timeout: Option<Duration>,
    /// Default start deadline after the due time (e.g. 10m).
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "no_expire_after")]
    expire_after: Option<Duration>,
    /// Clear the default start deadline.
    #[arg(long)]
    no_expire_after: bool,
    /// Rate limit across every worker: `5/s`, `300/m`, `1000/h` (0 for none).
    /// Tasks over it wait; none is dropped.
    #[arg(long, value_parser = parse_rate)]
    rate: Option<f64>,
    /// Starts allowed at once after a quiet spell (default 1).
    #[arg(long)]
    burst: Option<u32>,
}

/// Parses `R`, `R/s`, `R/m` or `R/h` into starts per second.
fn parse_rate(s: &str) -> Result<f64, String> {
    let (number, per) = s.split_once('/').unwrap_or((s, "s"));
    let n: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`{number}` is not a number"))?;
    let seconds = match per.trim() {
        "s" | "sec" | "second" => 1.0,
        "m" | "min" | "minute" => 60.0,
        "h" | "hour" => 3600.0,
        other => return Err(format!("unknown unit `{other}` (use s, m or h)")),
    };
    Ok(n / seconds)
}

impl SettingsArgs {
    fn change(self) -> QueueChange {
        QueueChange {
            max_concurrency: self.max_concurrency,
            max_attempts: self.max_attempts,
            initial_backoff: self.initial_backoff,
            max_backoff: self.max_backoff,
            multiplier: self.multiplier,
            jitter: self.jitter,
            run_timeout: self.run_timeout,
            expire_after: if self.no_expire_after {
                Some(None)
            } else {
                self.expire_after.map(Some)
            },
            rate_limit: self.rate,
            rate_burst: self.burst.or(self.rate.map(|_| 1)),
        }
    }
}

/// Queue commands.
#[derive(Debug, Subcommand)]
pub(crate) enum QueueCommand {
    /// Create a queue; unset settings take the server defaults.
    Create {
        /// Queue name.
        name: String,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// Change the settings given; running workers follow.
    Update {
        /// Queue name.
        name: String,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// Show a queue's settings and live figures.
    Get {
        /// Queue name.
        name: String,
    },
    /// List every queue.
    List,
    /// Stop releasing the queue's tasks to workers.
    Pause {
        /// Queue name.
        name: String,
    },
    /// Release waiting tasks again, oldest first.
    Resume {
        /// Queue name.
        name: String,
    },
}

fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn queue_json(q: &Queue) -> serde_json::Value {
    json!({
        "name": q.name,
        "max_concurrency": q.max_concurrency,
        "max_attempts": q.max_attempts,
        "initial_backoff": human(q.initial_backoff),
        "max_backoff": human(q.max_backoff),
        "multiplier": q.multiplier,
        "jitter": q.jitter,
        "run_timeout": human(q.run_timeout),
        "expire_after": q.expire_after.map(human),
        "rate_limit": q.rate_limit,
        "rate_burst": q.rate_burst,
        "paused": q.paused,
        "created_at": q.created_at.to_rfc3339(),
        "updated_at": q.updated_at.to_rfc3339(),
    })
}

fn stats_json(s: &QueueStats) -> serde_json::Value {
    json!({
        "scheduled": s.scheduled,
        "waiting": s.waiting,
        "running": s.running,
        "retrying": s.retrying,
        "succeeded_last_hour": s.succeeded_last_hour,
        "failed_last_hour": s.failed_last_hour,
        "dead_last_hour": s.dead_last_hour,
        "oldest_waiting_lateness": s.oldest_waiting_lateness.map(human),
    })
}

fn queue_line(q: &Queue) -> String {
    let concurrency = if q.max_concurrency == 0 {
        "unlimited".to_owned()
    } else {
        q.max_concurrency.to_string()
    };
    format!(
        "{:<20} {:<7} concurrency {:<9} attempts {}  backoff {}..{} x{} ±{}  run timeout {}{}",
        q.name,
        if q.paused { "paused" } else { "active" },
        concurrency,
        q.max_attempts,
        human(q.initial_backoff),
        human(q.max_backoff),
        q.multiplier,
        q.jitter,
        human(q.run_timeout),
        q.expire_after
            .map(|d| format!("  expire after {}", human(d)))
            .unwrap_or_default()
    ) + &if q.rate_limit > 0.0 {
        format!("  rate {}/s burst {}", q.rate_limit, q.rate_burst)
    } else {
        String::new()
    }
}

fn print_queue(q: &Queue, json: bool) {
    if json {
        println!("{}", queue_json(q));
    } else {
        println!("{}", queue_line(q));
    }
}

/// Runs one queue command.
pub(crate) async fn run(
    client: &mut Client,
    command: QueueCommand,
    json: bool,
) -> anyhow::Result<()> {
    match command {
        QueueCommand::Create { name, settings } => {
            print_queue(&client.create_queue(&name, settings.change()).await?, json);
        }
        QueueCommand::Update { name, settings } => {
            print_queue(&client.update_queue(&name, settings.change()).await?, json);
        }
        QueueCommand::Get { name } => {
            let (queue, stats) = client.get_queue(&name).await?;
            if json {
                let mut value = queue_json(&queue);
                value["stats"] = stats_json(&stats);
                println!("{value}");
            } else {
                println!("{}", queue_line(&queue));
                println!(
                    "  scheduled {}  waiting {}{}  running {}  retrying {}",
                    stats.scheduled,
                    stats.waiting,
                    stats
                        .oldest_waiting_lateness
                        .map(|d| format!(" (oldest {} late)", human(d)))
                        .unwrap_or_default(),
                    stats.running,
                    stats.retrying
                );
                println!(
                    "  last hour: succeeded {}  failed attempts {}  dead {}",
                    stats.succeeded_last_hour, stats.failed_last_hour, stats.dead_last_hour
                );
            }
        }
        QueueCommand::List => {
            let queues = client.list_queues().await?;
            if json {
                println!(
                    "{}",
                    json!({ "queues": queues.iter().map(queue_json).collect::<Vec<_>>() })
                );
            } else {
                for queue in &queues {
                    println!("{}", queue_line(queue));
                }
            }
        }
        QueueCommand::Pause { name } => print_queue(&client.pause_queue(&name).await?, json),
        QueueCommand::Resume { name } => print_queue(&client.resume_queue(&name).await?, json),
    }
    Ok(())
}

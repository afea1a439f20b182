//! `kairos`: the command-line tool for booking, cancelling and inspecting tasks.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use kairos_client::{Attempt, Client, NewTask, Task, TaskState};

mod queue_cli;
mod recurring_cli;
mod watch_cli;
use serde_json::json;

/// Kairos command-line tool.
#[derive(Debug, Parser)]
#[command(name = "kairos", version)]
struct Cli {
    /// kairos-server address.
    #[arg(
        long,
        global = true,
        env = "KAIROS_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    server: String,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Book a task.
    Schedule {
        /// Queue.
        #[arg(long, default_value = "default")]
        queue: String,
        /// Due instant (RFC 3339, e.g. 2026-12-01T15:15:00Z).
        #[arg(long, conflicts_with = "delay")]
        at: Option<DateTime<Utc>>,
        /// Due after this long (e.g. 90s, 5m).
        #[arg(long = "in", value_parser = humantime::parse_duration)]
        delay: Option<Duration>,
        /// Payload text.
        #[arg(long, conflicts_with = "payload_file")]
        payload: Option<String>,
        /// File whose bytes are the payload.
        #[arg(long)]
        payload_file: Option<PathBuf>,
        /// Media type of the payload.
        #[arg(long, default_value = "")]
        content_type: String,
        /// Idempotency key.
        #[arg(long)]
        key: Option<String>,
        /// Header NAME=VALUE (repeatable).
        #[arg(long = "header", value_parser = parse_header)]
        headers: Vec<(String, String)>,
        /// Start deadline after the due time (e.g. 5m).
        #[arg(long, value_parser = humantime::parse_duration)]
        expire_after: Option<Duration>,
        /// Attempts allowed.
        #[arg(long)]
        max_attempts: Option<u32>,
        /// Wait for the task to finish, printing its events; exit non-zero unless it succeeds.
        #[arg(long)]
        wait: bool,
        /// Longest wait with --wait.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        wait_timeout: Duration,
    },
    /// Dead tasks: list them with their errors, run them again.
    #[command(subcommand)]
    Dead(DeadCommand),
    /// Queues: global concurrency, retries, run timeout, pause.
    #[command(subcommand)]
    Queue(queue_cli::QueueCommand),
    /// Print task events as they happen (Ctrl-C to stop).
    Watch(watch_cli::WatchArgs),
    /// Cancel a task that has not started.
    Cancel {
        /// Task id.
        id: String,
    },
    /// Show a task and its attempts.
    Get {
        /// Task id.
        id: String,
    },
    /// List tasks, newest first.
    List {
        /// Only this queue.
        #[arg(long)]
        queue: Option<String>,
        /// Only this state (scheduled, dispatched, running, succeeded, retrying, dead, cancelled, expired).
        #[arg(long)]
        state: Option<TaskState>,
        /// Page size.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Page token from a previous listing.
        #[arg(long)]
        page_token: Option<String>,
        /// Only the occurrences of this recurring schedule.
        #[arg(long, conflicts_with_all = ["queue", "state"])]
        schedule: Option<String>,
    },
    /// Recurring schedules.
    #[command(subcommand)]
    Recurring(recurring_cli::RecurringCommand),
}

/// Dead-task commands.
#[derive(Debug, Subcommand)]
enum DeadCommand {
    /// List dead tasks, newest first, with each attempt's error.
    List {
        /// Only this queue.
        #[arg(long)]
        queue: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Run dead tasks again with a fresh set of attempts: one by id, or a queue's.
    Retry {
        /// The task to run again.
        #[arg(required_unless_present = "queue", conflicts_with = "queue")]
        id: Option<String>,
        /// Run again the dead tasks of this queue.
        #[arg(long)]
        queue: Option<String>,
        /// With --queue: only those whose last error contains this text.
        #[arg(long, requires = "queue")]
        error_contains: Option<String>,
        /// With --queue: at most this many, newest first.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    let (name, value) = s.split_once('=').ok_or("expected NAME=VALUE")?;
    Ok((name.to_owned(), value.to_owned()))
}

fn task_json(t: &Task) -> serde_json::Value {
    json!({
        "id": t.id,
        "queue": t.queue,
        "state": t.state.as_str(),
        "due_at": t.due_at.to_rfc3339(),
        "attempts": t.attempts,
        "max_attempts": t.max_attempts,
        "created_at": t.created_at.to_rfc3339(),
        "updated_at": t.updated_at.to_rfc3339(),
        "expire_at": t.expire_at.map(|e| e.to_rfc3339()),
        "idempotency_key": t.idempotency_key,
        "last_error": t.last_error,
        "schedule_id": t.occurrence.as_ref().map(|o| o.0.clone()),
        "fire_at": t.occurrence.as_ref().map(|o| o.1.to_rfc3339()),
    })
}

fn attempt_json(a: &Attempt) -> serde_json::Value {
    json!({
        "attempt": a.attempt,
        "worker_id": a.worker_id,
        "started_at": a.started_at.to_rfc3339(),
        "finished_at": a.finished_at.map(|f| f.to_rfc3339()),
        "outcome": a.outcome,
        "error": a.error,
        "detail": a.detail,
    })
}

fn task_line(t: &Task) -> String {
    format!(
        "{}  {:<10}  {:<12}  due {}  attempts {}/{}",
        t.id,
        t.state.as_str(),
        t.queue,
        t.due_at
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        t.attempts,
        t.max_attempts
    )
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // One line for people and scripts; no backtrace for an expected error.
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut client = Client::connect(&cli.server)
        .await
        .with_context(|| format!("cannot connect to {}", cli.server))?;
    match cli.command {
        Command::Schedule {
            queue,
            at,
            delay,
            payload,
            payload_file,
            content_type,
            key,
            headers,
            expire_after,
            max_attempts,
            wait,
            wait_timeout,
        } => {
            let mut task = NewTask::new(queue).content_type(content_type);
            task = match (at, delay) {
                (Some(at), _) => task.at(at),
                (None, Some(delay)) => task.delay(delay),
                (None, None) => task,
            };
            if let Some(text) = payload {
                task = task.payload(text);
            }
            if let Some(path) = payload_file {
                let bytes = std::fs::read(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                task = task.payload(bytes);
            }
            if let Some(key) = key {
                task = task.idempotency_key(key);
            }
            for (name, value) in headers {
                task = task.header(name, value);
            }
            if let Some(d) = expire_after {
                task = task.expire_after(d);
            }
            if let Some(n) = max_attempts {
                task = task.max_attempts(n);
            }
            let task = client.schedule(task).await?;
            if cli.json {
                println!("{}", task_json(&task));
            } else {
                println!("scheduled {}", task_line(&task));
            }
            if wait {
                watch_cli::wait_for(&client, &task.id, cli.json, wait_timeout).await?;
            }
        }
        Command::Cancel { id } => {
            let task = client.cancel(&id).await?;
            if cli.json {
                println!("{}", task_json(&task));
            } else {
                println!("cancelled {}", task.id);
            }
        }
        Command::Get { id } => {
            let (task, attempts) = client.get_task(&id).await?;
            if cli.json {
                let mut value = task_json(&task);
                value["attempt_log"] = attempts.iter().map(attempt_json).collect();
                println!("{value}");
            } else {
                println!("{}", task_line(&task));
                for a in &attempts {
                    println!(
                        "  attempt {}  {:<9}  worker {}  started {}{}",
                        a.attempt,
                        a.outcome,
                        a.worker_id,
                        a.started_at
                            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                        a.error
                            .as_deref()
                            .map(|e| format!("  error: {e}"))
                            .or_else(|| a.detail.as_deref().map(|d| format!("  {d}")))
                            .unwrap_or_default()
                    );
                }
            }
        }
        Command::List {
            queue,
            state,
            limit,
            page_token,
            schedule,
        } => {
            let page = match schedule {
                Some(id) => {
                    client
                        .list_occurrences(&id, limit, page_token.as_deref())
                        .await?
                }
                None => {
                    client
                        .list_tasks(queue.as_deref(), state, limit, page_token.as_deref())
                        .await?
                }
            };
            if cli.json {
                println!(
                    "{}",
                    json!({
                        "tasks": page.tasks.iter().map(task_json).collect::<Vec<_>>(),
                        "next_page_token": page.next_page_token,
                    })
                );
            } else {
                for task in &page.tasks {
                    println!("{}", task_line(task));
                }
                if let Some(token) = page.next_page_token {
                    println!("more: --page-token {token}");
                }
            }
        }
        Command::Dead(DeadCommand::List { queue, limit }) => {
            let page = client
                .list_tasks(queue.as_deref(), Some(TaskState::Dead), limit, None)
                .await?;
            let mut listed = Vec::new();
            for task in &page.tasks {
                let (_, attempts) = client.get_task(&task.id).await?;
                listed.push((task, attempts));
            }
            if cli.json {
                let tasks: Vec<serde_json::Value> = listed
                    .iter()
                    .map(|(task, attempts)| {
                        let mut value = task_json(task);
                        value["attempt_log"] = attempts.iter().map(attempt_json).collect();
                        value
                    })
                    .collect();
                println!("{}", json!({ "tasks": tasks }));
            } else {
                for (task, attempts) in &listed {
                    println!("{}", task_line(task));
                    for a in attempts {
                        println!(
                            "  attempt {}  {:<9}  {}",
                            a.attempt,
                            a.outcome,
                            a.error.as_deref().unwrap_or("")
                        );
                    }
                }
            }
        }
        Command::Dead(DeadCommand::Retry {
            id,
            queue,
            error_contains,
            limit,
        }) => {
            let (tasks, skipped) = match (id, queue) {
                (Some(id), _) => (vec![client.retry_task(&id).await?], Default::default()),
                (None, Some(queue)) => {
                    client
                        .retry_dead(&queue, error_contains.as_deref(), limit)
                        .await?
                }
                (None, None) => anyhow::bail!("give a task id or --queue"),
            };
            if cli.json {
                println!(
                    "{}",
                    json!({
                        "retried": tasks.iter().map(task_json).collect::<Vec<_>>(),
                        "skipped": skipped,
                    })
                );
            } else {
                for task in &tasks {
                    println!("retried {}", task_line(task));
                }
                for (id, reason) in &skipped {
                    println!("skipped {id}: {reason}");
                }
            }
        }
        Command::Queue(command) => queue_cli::run(&mut client, command, cli.json).await?,
        Command::Watch(args) => watch_cli::watch(&client, args, cli.json).await?,
        Command::Recurring(command) => recurring_cli::run(&mut client, command, cli.json).await?,
    }
    Ok(())
}

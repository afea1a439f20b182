//! `kairos watch` and `kairos schedule --wait`: task events as they happen.

use std::io::IsTerminal as _;
use std::time::Duration;

use futures::StreamExt as _;
use kairos_client::{Client, Subscribe, TaskEvent, TaskState};
use serde_json::json;

/// How long a broken subscription keeps trying to resume before the tool gives up.
const PATIENCE: Duration = Duration::from_secs(60);

/// Options of `kairos watch`.
#[derive(Debug, clap::Args)]
pub(crate) struct WatchArgs {
    /// Only this queue.
    #[arg(long)]
    queue: Option<String>,
    /// Only this task (repeatable).
    #[arg(long = "task")]
    tasks: Vec<String>,
    /// Only occurrences of this recurring schedule.
    #[arg(long)]
    schedule: Option<String>,
    /// Only these states (repeatable).
    #[arg(long = "state")]
    states: Vec<TaskState>,
    /// Replay every event after this cursor first.
    #[arg(long = "from", conflicts_with = "from_beginning")]
    from: Option<u64>,
    /// Replay the whole history of the --task or --schedule first.
    #[arg(long)]
    from_beginning: bool,
}

/// Whether lines get ANSI colours: only on a terminal, and never with NO_COLOR.
fn colour() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

fn event_json(e: &TaskEvent) -> serde_json::Value {
    json!({
        "cursor": e.cursor,
        "task_id": e.task_id,
        "schedule_id": e.schedule_id,
        "queue": e.queue,
        "attempt": e.attempt,
        "state": e.state.as_str(),
        "time": e.time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "worker_id": e.worker_id,
        "error": e.error,
    })
}

fn event_line(e: &TaskEvent, colour: bool) -> String {
    let state = format!("{:<10}", e.state.as_str());
    let state = if colour {
        let code = match e.state {
            TaskState::Succeeded => "32",
            TaskState::Dead => "31",
            TaskState::Retrying => "33",
            TaskState::Running => "36",
            TaskState::Cancelled | TaskState::Expired | TaskState::Skipped => "35",
            _ => "2",
        };
        format!("\x1b[{code}m{state}\x1b[0m")
    } else {
        state
    };
    let mut line = format!(
        "{:>8}  {}  {}  {}  {:<12}  attempt {}",
        e.cursor,
        e.time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        e.task_id,
        state,
        e.queue,
        e.attempt
    );
    if let Some(worker) = &e.worker_id {
        line.push_str(&format!("  worker {worker}"));
    }
    if let Some(error) = &e.error {
        line.push_str(&format!("  error: {error}"));
    }
    line
}

fn print_event(e: &TaskEvent, json: bool, colour: bool) {
    if json {
        println!("{}", event_json(e));
    } else {
        println!("{}", event_line(e, colour));
    }
}

/// Prints events as they come until interrupted.
pub(crate) async fn watch(client: &Client, args: WatchArgs, json: bool) -> anyhow::Result<()> {
    let mut subscription = Subscribe {
        task_ids: args.tasks,
        schedule_id: args.schedule,
        queue: args.queue,
        states: args.states,
        ..Subscribe::default()
    };
    if let Some(cursor) = args.from {
        subscription = subscription.after(cursor);
    }
    if args.from_beginning {
        subscription = subscription.from_beginning();
    }
    let mut events = client.subscribe(subscription, PATIENCE).await?;
    let colour = colour() && !json;
    while let Some(event) = events.next().await {
        print_event(&event?, json, colour);
    }
    Ok(())
}

/// Prints the events of one task until it reaches a final state; fails
/// unless that state is SUCCEEDED.
pub(crate) async fn wait_for(
    client: &Client,
    task_id: &str,
    json: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    // From the beginning: nothing the task did before the stream opened is missed.
    let subscription = Subscribe::all().task(task_id).from_beginning();
    let colour = colour() && !json;
    let wait = async {
        let mut events = client.subscribe(subscription, PATIENCE).await?;
        while let Some(event) = events.next().await {
            let event = event?;
            print_event(&event, json, colour);
            if event.state.is_final() {
                return Ok(event);
            }
        }
        anyhow::bail!("the event stream ended before task {task_id} finished")
    };
    let last = tokio::time::timeout(timeout, wait).await.map_err(|_| {
        anyhow::anyhow!(
            "task {task_id} did not finish within {}",
            humantime::format_duration(timeout)
        )
    })??;
    if last.state != TaskState::Succeeded {
        anyhow::bail!(
            "task {task_id} ended {}{}",
            last.state.as_str(),
            last.error.map(|e| format!(": {e}")).unwrap_or_default()
        );
    }
    Ok(())
}

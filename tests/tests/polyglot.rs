//! The Python and TypeScript producers of `examples/`, on the clients that
//! `scripts/gen-clients.sh` generates from the proto, against a live server: a
//! proto change that breaks a generated client fails here. SQLite only: what
//! is under test is the wire contract, and every backend test runs elsewhere.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveDateTime, Timelike, Utc, Weekday};
use kairos_client::TaskState;
use kairos_tests::stack::client;
use kairos_tests::{Backend, RunLog, Stack, program};
use tokio::process::Command;

/// Tasks each example books.
const USERS: usize = 10_000;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs an example against `server` and returns what it printed.
async fn run(program: &Path, script: &str, server: &str) -> String {
    let generated = repo().join("clients");
    assert!(
        generated.join("python/kairos/v1/scheduler_pb2.py").exists()
            && generated
                .join("typescript/kairos/v1/scheduler_pb.ts")
                .exists(),
        "no generated clients under {}: run ./scripts/gen-clients.sh",
        generated.display()
    );
    let child = Command::new(program)
        .arg(script)
        .current_dir(repo())
        .env("KAIROS_SERVER", server)
        .env("KAIROS_QUEUE", "default")
        .env("PYTHONPATH", generated.join("python"))
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the example");
    let output = tokio::time::timeout(Duration::from_secs(240), child.wait_with_output())
        .await
        .expect("example finished within 240 s")
        .expect("example output");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{script} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    stdout
}

/// The one line of `out` that starts with `prefix`, without the prefix.
fn line<'a>(out: &'a str, prefix: &str) -> &'a str {
    let found: Vec<&str> = out
        .lines()
        .filter_map(|line| line.strip_prefix(prefix))
        .collect();
    assert_eq!(found.len(), 1, "one line starting {prefix:?} in:\n{out}");
    found[0]
}

/// Books 10,000 for one instant, cancels one, looks one up, follows the
/// queue's events until all are done, creates the Seoul reminder; then checks
/// what it printed against what the workers and the server saw.
async fn producer_example(program: PathBuf, script: &str) {
    let stack = Stack::start(Backend::Sqlite).await;
    let mut config = stack.config();
    // Small enough that the example's watch falls behind in the burst: it
    // must resume after the last event it saw, as a subscriber cut off
    // (ABORTED) does.
    config.subscribe_buffer = 50;
    let server = stack.server_with(config).await;
    let mut client = client(&server).await;
    let log = RunLog::default();
    let _worker = stack.worker(&server, "default", 64, log.handler());

    let out = run(&program, script, &server.url).await;

    assert!(
        out.lines()
            .any(|line| line.starts_with(&format!("booked {USERS}/{USERS} for "))),
        "progress reached {USERS}:\n{out}"
    );
    let cancelled = line(&out, "cancelled ")
        .strip_suffix(": CANCELLED")
        .unwrap_or_else(|| panic!("cancel line ends in CANCELLED:\n{out}"));
    let looked_up: Vec<&str> = line(&out, "task ").split(", ").collect();
    let (looked_up_id, looked_up_state) = looked_up[0].split_once(": ").expect("id: state");
    assert_eq!(looked_up_state, "SCHEDULED", "{out}");
    assert_eq!(looked_up[1], "queue default", "{out}");
    assert_eq!(looked_up[3], "0 attempts", "{out}");
    assert_eq!(
        line(&out, "done: "),
        format!("1 CANCELLED, {} SUCCEEDED", USERS - 1)
    );
    assert_eq!(
        line(&out, "the cancelled task "),
        format!("{cancelled} never ran")
    );

    // What the workers saw: every other task ran exactly once, the cancelled
    // one never, none before it was due.
    let counts: HashMap<String, usize> = log.counts();
    assert_eq!(counts.len(), USERS - 1);
    assert!(counts.values().all(|&n| n == 1), "a task ran twice");
    assert!(!counts.contains_key(cancelled));
    assert!(log.runs().iter().all(|run| run.at >= run.due_at));
    let (task, _) = client.get_task(cancelled).await.expect("cancelled task");
    assert_eq!(task.state, TaskState::Cancelled);
    let (task, attempts) = client.get_task(looked_up_id).await.expect("looked-up task");
    assert_eq!(task.state, TaskState::Succeeded);
    assert_eq!(attempts.len(), 1);
    assert_eq!(
        looked_up[2],
        format!("due {}", task.due_at.format("%H:%M:%SZ")),
        "{out}"
    );

    // The reminder: Mondays and Fridays at 09:00 in Seoul, 00:00 UTC.
    let reminder = line(&out, "reminder ");
    let (id, rest) = reminder.split_once(' ').expect("reminder id");
    let (what, fires) = rest.split_once(": next ").expect("next fire times");
    assert_eq!(what, "(0 9 * * MON,FRI, Asia/Seoul)");
    let fires: Vec<DateTime<Utc>> = fires
        .split(", ")
        .map(|fire| {
            let (day, at) = fire.split_once(' ').expect("day and instant");
            let at = NaiveDateTime::parse_from_str(at, "%Y-%m-%dT%H:%MZ")
                .expect("instant")
                .and_utc();
            assert_eq!(day, at.format("%a").to_string());
            at
        })
        .collect();
    assert!(!fires.is_empty());
    for fire in &fires {
        assert!(
            matches!(fire.weekday(), Weekday::Mon | Weekday::Fri),
            "{fire}"
        );
        assert_eq!((fire.hour(), fire.minute()), (0, 0), "{fire}");
    }
    let schedule = client.get_recurring(id).await.expect("reminder stored");
    assert_eq!(schedule.queue, "reminders");
    assert_eq!(schedule.next_fire_times, fires);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_producer_books_cancels_watches_and_reminds() {
    let python = program(
        "KAIROS_PYTHON",
        ".kairos/tools/venv/bin/python",
        "./scripts/gen-clients.sh",
    );
    producer_example(python, "examples/python/producer.py").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_producer_books_cancels_watches_and_reminds() {
    let tsx = program(
        "KAIROS_TSX",
        "node_modules/.bin/tsx",
        "./scripts/gen-clients.sh",
    );
    producer_example(tsx, "examples/typescript/producer.ts").await;
}

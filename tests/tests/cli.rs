//! The `kairos` command-line tool as an operator types it, against a live
//! server: queues, `schedule --wait`, `watch`, dead letters, get, list and
//! cancel. SQLite only: the tool speaks the same API the backend tests cover.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use kairos_tests::{Backend, Stack, program};
use kairos_worker::{HandlerError, handler_fn};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

/// The `kairos` binary of one server.
struct Tool {
    bin: PathBuf,
    server: String,
}

impl Tool {
    fn new(server: &str) -> Self {
        let bin = program(
            "KAIROS_CLI_BIN",
            "target/debug/kairos",
            "cargo build -p kairos-client --bin kairos",
        );
        Self {
            bin,
            server: server.to_owned(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.bin);
        command
            .arg("--server")
            .arg(&self.server)
            .args(args)
            .env_remove("KAIROS_SERVER")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    async fn run(&self, args: &[&str]) -> Output {
        let output = self.command(args).output();
        tokio::time::timeout(Duration::from_secs(60), output)
            .await
            .unwrap_or_else(|_| panic!("kairos {args:?} finished within 60 s"))
            .expect("run kairos")
    }

    /// Runs a command that must succeed; returns what it printed.
    async fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args).await;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "kairos {args:?} failed ({}):\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    /// Runs a command with `--json` that must succeed; returns its one line.
    async fn json(&self, args: &[&str]) -> Value {
        let stdout = self.ok(&[&["--json"], args].concat()).await;
        serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("kairos {args:?} printed no JSON ({e}): {stdout}"))
    }

    /// Runs a `--json` command until `check` holds for what it prints (30 s at most).
    async fn json_until(&self, args: &[&str], check: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let value = self.json(args).await;
            if check(&value) {
                return value;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "kairos {args:?} never got there: {value}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs a command that must fail; returns its error output.
    async fn fails(&self, args: &[&str]) -> (String, String) {
        let output = self.run(args).await;
        assert!(!output.status.success(), "kairos {args:?} succeeded");
        (
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

fn text<'a>(value: &'a Value, field: &str) -> &'a str {
    value[field]
        .as_str()
        .unwrap_or_else(|| panic!("no string {field} in {value}"))
}

/// Queue create, update, list, get with live figures, pause and resume, and
/// a bad name refused with the field and the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_commands_create_update_pause_and_report() {
    let stack = Stack::start(Backend::Sqlite).await;
    let server = stack.server().await;
    let tool = Tool::new(&server.url);

    let created = tool
        .json(&[
            "queue",
            "create",
            "billing",
            "--max-concurrency",
            "2",
            "--rate",
            "300/m",
            "--max-attempts",
            "5",
            "--run-timeout",
            "45s",
            "--expire-after",
            "10m",
        ])
        .await;
    assert_eq!(created["max_concurrency"], 2);
    assert_eq!(created["rate_limit"], 5.0, "300/m is 5/s");
    assert_eq!(created["max_attempts"], 5);
    assert_eq!(text(&created, "run_timeout"), "45s");
    assert_eq!(text(&created, "expire_after"), "10m");
    assert_eq!(created["paused"], false);

    let updated = tool
        .json(&[
            "queue",
            "update",
            "billing",
            "--max-concurrency",
            "3",
            "--no-expire-after",
        ])
        .await;
    assert_eq!(updated["max_concurrency"], 3);
    assert_eq!(updated["rate_limit"], 5.0, "settings not given are kept");
    assert!(updated["expire_after"].is_null());

    let listed = tool.ok(&["queue", "list"]).await;
    let line = listed
        .lines()
        .find(|l| l.starts_with("billing "))
        .unwrap_or_else(|| panic!("billing not listed:\n{listed}"));
    assert!(
        line.contains("concurrency 3") && line.contains("rate 5/s"),
        "{line}"
    );

    let paused = tool.ok(&["queue", "pause", "billing"]).await;
    assert!(paused.contains(" paused "), "{paused}");
    let booked = tool
        .json(&["schedule", "--queue", "billing", "--payload", "renewal"])
        .await;
    let queue = tool
        .json_until(&["queue", "get", "billing"], |q| q["stats"]["waiting"] == 1)
        .await;
    assert_eq!(queue["paused"], true);
    assert_eq!(queue["stats"]["scheduled"], 0);
    assert_eq!(queue["stats"]["running"], 0);
    let shown = tool.ok(&["queue", "get", "billing"]).await;
    assert!(shown.contains("waiting 1"), "{shown}");
    let resumed = tool.json(&["queue", "resume", "billing"]).await;
    assert_eq!(resumed["paused"], false);
    let task = tool.json(&["get", text(&booked, "id")]).await;
    assert_eq!(text(&task, "queue"), "billing");

    let (_, error) = tool
        .fails(&["queue", "create", "no spaces", "--max-concurrency", "1"])
        .await;
    assert!(
        error.contains("name") && error.contains("must be 1 to"),
        "{error}"
    );
    let (_, error) = tool
        .fails(&["queue", "update", "billing", "--jitter", "2"])
        .await;
    assert!(error.contains("jitter"), "{error}");
    let names: Vec<String> = tool.json(&["queue", "list"]).await["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .map(|q| text(q, "name").to_owned())
        .collect();
    assert!(!names.iter().any(|n| n == "no spaces"), "{names:?}");
    assert_eq!(
        tool.json(&["queue", "get", "billing"]).await["max_concurrency"],
        3,
        "a refused update changes nothing"
    );
}

/// `schedule --wait` exits 0 on success and non-zero with the error on
/// failure; `dead list` shows the failure and `dead retry` runs it again;
/// `cancel`, `get` and `list` agree; a `watch --from 0` started before all
/// of it printed every event as a JSON line, in order. Colour only on a
/// terminal, and not with NO_COLOR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_wait_watch_and_dead_letters() {
    let stack = Stack::start(Backend::Sqlite).await;
    let server = stack.server().await;
    let tool = Tool::new(&server.url);
    let handler = handler_fn(|task| async move {
        match (task.payload().as_ref(), task.attempt()) {
            (b"declined", 1) => Err(HandlerError::terminal("card declined")),
            _ => Ok(()),
        }
    });
    let _worker = stack.worker(&server, "cli", 4, handler);

    // From cursor 0: every event of this fresh installation, none missed
    // while the stream opens.
    let mut watch = tool
        .command(&["--json", "watch", "--queue", "cli", "--from", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start kairos watch");
    let (lines_tx, mut lines) = mpsc::unbounded_channel();
    let mut reader = BufReader::new(watch.stdout.take().expect("stdout")).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = reader.next_line().await {
            let _ = lines_tx.send(line);
        }
    });

    let waited = tool
        .ok(&["schedule", "--queue", "cli", "--payload", "fine", "--wait"])
        .await;
    let first = waited.lines().next().expect("a first line");
    assert!(first.starts_with("scheduled "), "{waited}");
    let ok_id = first.split_whitespace().nth(1).expect("id").to_owned();
    let last = waited.lines().last().expect("a last line");
    assert!(
        last.contains("succeeded") && last.contains(&ok_id),
        "{waited}"
    );
    assert!(!waited.contains('\x1b'), "no colour when not on a terminal");
    let on_terminal = |no_color: bool| {
        // `script` gives the tool a terminal, as a person at a shell has.
        let line = format!(
            "{} --server {} schedule --queue cli --payload fine --wait",
            tool.bin.display(),
            tool.server
        );
        let mut command = Command::new("script");
        command
            .args(["-qec", &line, "/dev/null"])
            .stdin(Stdio::null())
            .env_remove("NO_COLOR");
        if no_color {
            command.env("NO_COLOR", "1");
        }
        async move {
            let output = command.output().await.expect("run script");
            assert!(output.status.success(), "{output:?}");
            String::from_utf8_lossy(&output.stdout).into_owned()
        }
    };
    let coloured = on_terminal(false).await;
    assert!(coloured.contains("\x1b[32msucceeded"), "{coloured:?}");
    assert!(
        !on_terminal(true).await.contains('\x1b'),
        "NO_COLOR is obeyed"
    );

    let (stdout, error) = tool
        .fails(&[
            "--json",
            "schedule",
            "--queue",
            "cli",
            "--payload",
            "declined",
            "--wait",
        ])
        .await;
    let printed: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let dead_id = text(&printed[0], "id").to_owned();
    assert_eq!(text(printed.last().expect("events"), "state"), "dead");
    assert!(
        error.contains(&format!("task {dead_id} ended dead: card declined")),
        "{error}"
    );

    let dead = tool.json(&["dead", "list", "--queue", "cli"]).await;
    let dead_tasks = dead["tasks"].as_array().expect("tasks");
    assert_eq!(dead_tasks.len(), 1, "{dead}");
    assert_eq!(text(&dead_tasks[0], "id"), dead_id);
    assert_eq!(
        text(&dead_tasks[0]["attempt_log"][0], "error"),
        "card declined"
    );
    let retried = tool.json(&["dead", "retry", &dead_id]).await;
    assert_eq!(text(&retried["retried"][0], "id"), dead_id);
    let again = tool
        .json_until(&["get", &dead_id], |t| t["state"] == "succeeded")
        .await;
    assert_eq!(again["attempts"], 2);
    assert_eq!(again["attempt_log"].as_array().map(Vec::len), Some(2));
    let (_, error) = tool.fails(&["dead", "retry", &dead_id]).await;
    assert!(
        error.contains("not dead") || error.contains("dead"),
        "{error}"
    );

    let later = tool
        .json(&["schedule", "--queue", "cli", "--in", "1h", "--key", "later"])
        .await;
    let later_id = text(&later, "id").to_owned();
    assert_eq!(
        tool.ok(&["cancel", &later_id]).await.trim(),
        format!("cancelled {later_id}")
    );
    let cancelled = tool
        .json(&["list", "--queue", "cli", "--state", "cancelled"])
        .await;
    let cancelled_ids: Vec<&str> = cancelled["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| text(t, "id"))
        .collect();
    assert_eq!(cancelled_ids, [later_id.as_str()]);
    let (_, error) = tool
        .fails(&["schedule", "--queue", "cli", "--max-attempts", "0"])
        .await;
    assert!(error.contains("max_attempts"), "{error}");

    // The watch saw all of it, each task's events in order.
    let mut states: HashMap<String, Vec<String>> = HashMap::new();
    let mut cursors = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while states
        .get(&later_id)
        .is_none_or(|s| !s.contains(&"cancelled".into()))
        || states
            .get(&dead_id)
            .is_none_or(|s| s.last().is_none_or(|l| l != "succeeded"))
    {
        let line = tokio::time::timeout_at(deadline, lines.recv())
            .await
            .unwrap_or_else(|_| panic!("watch stopped short: {states:?}"))
            .expect("watch still running");
        let event: Value = serde_json::from_str(&line).expect("JSON event");
        for field in ["cursor", "task_id", "queue", "attempt", "state", "time"] {
            assert!(!event[field].is_null(), "{field} missing in {event}");
        }
        assert_eq!(text(&event, "queue"), "cli");
        cursors.push(event["cursor"].as_u64().expect("cursor"));
        states
            .entry(text(&event, "task_id").to_owned())
            .or_default()
            .push(text(&event, "state").to_owned());
    }
    watch.kill().await.expect("stop watch");
    assert!(cursors.is_sorted(), "cursors in log order");
    let in_order = |id: &str, expected: &[&str]| {
        let seen = &states[id];
        let mut rest = seen.iter();
        for state in expected {
            assert!(
                rest.any(|s| s == state),
                "{id}: {expected:?} is not in order in {seen:?}"
            );
        }
    };
    in_order(&ok_id, &["scheduled", "running", "succeeded"]);
    in_order(
        &dead_id,
        &["scheduled", "running", "dead", "running", "succeeded"],
    );
    in_order(&later_id, &["scheduled", "cancelled"]);
}

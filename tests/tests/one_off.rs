//! One-off tasks end to end: scheduled over gRPC, kept in JetStream, claimed
//! in Redis, run by a worker, looked up in SQL.

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use kairos_client::{NewTask, TaskState};
use kairos_tests::stack::{client, wait_for_state};
use kairos_tests::{Backend, RunLog, Stack, backend_tests};
use kairos_worker::{HandlerError, handler_fn};

fn recording(log: &RunLog) -> impl kairos_worker::Handler {
    let log = log.clone();
    handler_fn(move |task| {
        let log = log.clone();
        async move {
            log.record(&task);
            Ok::<(), HandlerError>(())
        }
    })
}

/// A task scheduled 2 s ahead runs exactly once, and not before its due time.
async fn task_runs_once_not_before_due(backend: Backend) {
    let stack = Stack::start(backend).await;
    let server = stack.server().await;
    let log = RunLog::default();
    let _worker = stack.worker(&server, "default", 4, recording(&log));
    let mut client = client(&server).await;

    let task = client
        .schedule(NewTask::new("default").payload("hello").delay(Duration::from_secs(2)))
        .await
        .expect("schedule");
    assert_eq!(task.state, TaskState::Scheduled);
    let (seen, _) = client.get_task(&task.id).await.expect("visible at once");
    assert_eq!(seen.id, task.id);

    log.wait_for(1, Duration::from_secs(15)).await;
    let done = wait_for_state(&mut client, &task.id, TaskState::Succeeded, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let runs = log.runs();
    assert_eq!(runs.len(), 1, "ran exactly once");
    assert!(runs[0].at >= task.due_at, "ran {} before due {}", runs[0].at, task.due_at);
    assert_eq!(done.attempts, 1);
    let (_, attempts) = client.get_task(&task.id).await.expect("get");
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].outcome, "succeeded");
}

backend_tests!(task_runs_once_not_before_due);

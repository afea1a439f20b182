//! One-off tasks end to end: scheduled over gRPC, kept in JetStream, claimed
//! in Redis, run by a worker, looked up in SQL.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use kairos_client::{Attempt, Client, NewTask, QueueChange, Task, TaskState};
use kairos_proto::wire;
use kairos_tests::stack::{client, wait_for_state};
use kairos_tests::{Backend, RunLog, ServerHandle, Stack, WorkerHandle, backend_tests};
use kairos_worker::{HandlerError, handler_fn};

/// A task scheduled 2 s ahead runs exactly once, and not before its due time.
async fn task_runs_once_not_before_due(backend: Backend) {
    let stack = Stack::start(backend).await;
    let server = stack.server().await;
    let log = RunLog::default();
    let _worker = stack.worker(&server, "default", 4, log.handler());
    let mut client = client(&server).await;

    let task = client
        .schedule(
            NewTask::new("default")
                .payload("hello")
                .delay(Duration::from_secs(2)),
        )
        .await
        .expect("schedule");
    assert_eq!(task.state, TaskState::Scheduled);
    let (seen, _) = client.get_task(&task.id).await.expect("visible at once");
    assert_eq!(seen.id, task.id);

    log.wait_for(1, Duration::from_secs(15)).await;
    let done = wait_for_state(
        &mut client,
        &task.id,
        TaskState::Succeeded,
        Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let runs = log.runs();
    assert_eq!(runs.len(), 1, "ran exactly once");
    assert!(
        runs[0].at >= task.due_at,
        "ran {} before due {}",
        runs[0].at,
        task.due_at
    );
    assert_eq!(done.attempts, 1);
    let (_, attempts) = client.get_task(&task.id).await.expect("get");
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].outcome, "succeeded");
}

/// 2,000 tasks with random due times over the next 5 s, booked with
/// ScheduleBatch: each runs exactly once, none early, each SUCCEEDED with one attempt.
async fn batch_of_2000_runs_each_once_on_time(backend: Backend) {
    let stack = Stack::start(backend).await;
    let server = stack.server().await;
    let log = RunLog::default();
    let _worker = stack.worker(&server, "push", 32, log.handler());
    let mut client = client(&server).await;

    let now = Utc::now();
    let mut ids = HashSet::new();
    let mut due = HashMap::new();
    for chunk in 0..2 {
        let tasks = (0..1000)
            .map(|i| {
                let offset = rand::random_range(500..5000);
                NewTask::new("push")
                    .payload(format!("user-{chunk}-{i}"))
                    .at(now + chrono::Duration::milliseconds(offset))
            })
            .collect();
        for result in client.schedule_batch(tasks).await.expect("batch") {
            let task = result.expect("item stored");
            due.insert(task.id.clone(), task.due_at);
            ids.insert(task.id);
        }
    }
    assert_eq!(ids.len(), 2000);

    log.wait_for(2000, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let counts = log.counts();
    assert_eq!(counts.len(), 2000, "every task ran");
    assert!(
        counts.values().all(|&n| n == 1),
        "each task ran exactly once"
    );
    for run in log.runs() {
        assert!(
            run.at >= due[&run.task_id],
            "task {} ran early",
            run.task_id
        );
    }
    let mut succeeded = 0;
    let mut token: Option<String> = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let page = client
            .list_tasks(
                Some("push"),
                Some(TaskState::Succeeded),
                1000,
                token.as_deref(),
            )
            .await
            .expect("list");
        for task in &page.tasks {
            assert_eq!(task.attempts, 1, "task {} attempts", task.id);
        }
        succeeded += page.tasks.len();
        match page.next_page_token {
            Some(next) => token = Some(next),
            None if succeeded < 2000 && std::time::Instant::now() < deadline => {
                // The last results may still be in the recorder's batch.
                tokio::time::sleep(Duration::from_millis(200)).await;
                succeeded = 0;
                token = None;
            }
            None => break,
        }
    }
    assert_eq!(succeeded, 2000, "ListTasks shows every task SUCCEEDED");
}

/// Books two tasks on "default" due after `delay`: one to cancel, one to keep.
async fn doomed_and_kept(client: &mut Client, delay: Duration) -> (Task, Task) {
    let mut book = async || {
        client
            .schedule(NewTask::new("default").delay(delay))
            .await
            .expect("schedule")
    };
    (book().await, book().await)
}

/// Waits for `kept` to succeed, then checks that the cancelled `doomed` never
/// ran and is CANCELLED; returns its attempts.
async fn cancelled_never_ran(
    client: &mut Client,
    log: &RunLog,
    doomed: &Task,
    kept: &Task,
) -> Vec<Attempt> {
    wait_for_state(
        client,
        &kept.id,
        TaskState::Succeeded,
        Duration::from_secs(15),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        log.counts().get(&doomed.id),
        None,
        "a cancelled task never runs"
    );
    let (after, attempts) = client.get_task(&doomed.id).await.expect("get");
    assert_eq!(after.state, TaskState::Cancelled);
    attempts
}

/// Cancel before the due time: CANCELLED, and the task never runs; cancel
/// of a finished task: FAILED_PRECONDITION naming its state.
async fn cancel_before_due_never_runs_and_after_finish_fails(backend: Backend) {
    let stack = Stack::start(backend).await;
    let server = stack.server().await;
    let log = RunLog::default();
    let _worker = stack.worker(&server, "default", 4, log.handler());
    let mut client = client(&server).await;

    let (doomed, kept) = doomed_and_kept(&mut client, Duration::from_secs(2)).await;
    let cancelled = client.cancel(&doomed.id).await.expect("cancel");
    assert_eq!(cancelled.state, TaskState::Cancelled);
    cancelled_never_ran(&mut client, &log, &doomed, &kept).await;

    let err = client.cancel(&kept.id).await.expect_err("finished task");
    assert_eq!(err.code, tonic::Code::FailedPrecondition);
    assert!(
        err.message.contains("succeeded"),
        "names the state: {}",
        err.message
    );

    let err = client
        .cancel(&uuid::Uuid::now_v7().to_string())
        .await
        .expect_err("unknown id");
    assert_eq!(err.code, tonic::Code::NotFound);
}

/// Cancels racing dispatch: 300 tasks due at once, each cancelled at that
/// moment; every task either ran or was cancelled, never both, and Cancel's
/// answer matches what happened.
async fn cancel_racing_dispatch_is_exclusive(backend: Backend) {
    let stack = Stack::start(backend).await;
    let server = stack.server().await;
    let log = RunLog::default();
    let _worker = stack.worker(&server, "race", 16, log.handler());
    let mut client = client(&server).await;

    let due = Utc::now() + chrono::Duration::milliseconds(1500);
    let tasks: Vec<_> = (0..300).map(|_| NewTask::new("race").at(due)).collect();
    let ids: Vec<String> = client
        .schedule_batch(tasks)
        .await
        .expect("batch")
        .into_iter()
        .map(|r| r.expect("stored").id)
        .collect();

    // Cancels land from 100 ms before to 400 ms after the due instant, so
    // some beat the release, some meet it, and some come after the start.
    let mut handles = Vec::new();
    for id in ids.clone() {
        let mut client = client.clone();
        let at = due + chrono::Duration::milliseconds(rand::random_range(-100..400));
        handles.push(tokio::spawn(async move {
            let wait = (at - Utc::now()).to_std().unwrap_or_default();
            tokio::time::sleep(wait).await;
            let result = client.cancel(&id).await;
            (id, result)
        }));
    }
    let mut cancelled = HashSet::new();
    let mut refused = HashSet::new();
    for handle in handles {
        let (id, result) = handle.await.expect("join");
        match result {
            Ok(task) => {
                assert_eq!(task.state, TaskState::Cancelled);
                cancelled.insert(id);
            }
            Err(err) => {
                assert_eq!(err.code, tonic::Code::FailedPrecondition, "{err}");
                refused.insert(id);
            }
        }
    }
    log.wait_for(refused.len(), Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let counts = log.counts();
    for id in &ids {
        let ran = counts.get(id).copied().unwrap_or(0);
        if cancelled.contains(id) {
            assert_eq!(ran, 0, "cancelled task {id} ran");
        } else {
            assert_eq!(ran, 1, "task {id} whose cancel was refused ran {ran} times");
        }
    }
    assert_eq!(cancelled.len() + refused.len(), ids.len());
    eprintln!("cancelled {}, refused {}", cancelled.len(), refused.len());
}

/// A past-due task runs at once; a task whose start deadline passed before
/// it could start is EXPIRED and never runs (at dispatch, and at a late worker).
async fn past_due_runs_at_once_and_expired_never_runs(backend: Backend) {
    let stack = Stack::start(backend).await;
    let server = stack.server().await;
    let mut client = client(&server).await;

    // Dispatched while no worker runs: it expires at the worker's start claim.
    let late_start = client
        .schedule(NewTask::new("default").expire_after(Duration::from_secs(1)))
        .await
        .expect("schedule");
    wait_for_state(
        &mut client,
        &late_start.id,
        TaskState::Dispatched,
        Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let log = RunLog::default();
    let _worker = stack.worker(&server, "default", 4, log.handler());
    let past = client
        .schedule(NewTask::new("default").at(Utc::now() - chrono::Duration::hours(1)))
        .await
        .expect("schedule past-due");
    let expired = client
        .schedule(
            NewTask::new("default")
                .at(Utc::now() - chrono::Duration::seconds(10))
                .expire_after(Duration::from_secs(1)),
        )
        .await
        .expect("schedule expired");
    let started = std::time::Instant::now();
    log.wait_for(1, Duration::from_secs(10)).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "past-due task ran at once"
    );
    wait_for_state(
        &mut client,
        &past.id,
        TaskState::Succeeded,
        Duration::from_secs(10),
    )
    .await;
    wait_for_state(
        &mut client,
        &expired.id,
        TaskState::Expired,
        Duration::from_secs(10),
    )
    .await;
    wait_for_state(
        &mut client,
        &late_start.id,
        TaskState::Expired,
        Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts = log.counts();
    assert_eq!(counts.get(&past.id), Some(&1));
    assert_eq!(counts.get(&expired.id), None, "expired task never runs");
    assert_eq!(counts.get(&late_start.id), None, "expired task never runs");
}

/// A failing handler is retried with backoff up to max_attempts, then the
/// task is DEAD with every attempt and its error; a non-retryable error makes
/// it DEAD at once.
async fn failures_retry_with_backoff_then_dead(backend: Backend) {
    let stack = Stack::start(backend).await;
    let server = stack.server().await;
    let log = RunLog::default();
    let handler = {
        let log = log.clone();
        handler_fn(move |task| {
            let log = log.clone();
            async move {
                log.record(&task);
                if task.payload().as_ref() == b"terminal" {
                    Err(HandlerError::terminal("card declined"))
                } else {
                    Err(HandlerError::retryable(format!(
                        "gateway timeout #{}",
                        task.attempt()
                    )))
                }
            }
        })
    };
    let _worker = stack.worker(&server, "billing", 4, handler);
    let mut client = client(&server).await;

    let flaky = client
        .schedule(NewTask::new("billing").payload("retry").max_attempts(3))
        .await
        .expect("schedule");
    let fatal = client
        .schedule(NewTask::new("billing").payload("terminal").max_attempts(3))
        .await
        .expect("schedule");

    let dead = wait_for_state(
        &mut client,
        &flaky.id,
        TaskState::Dead,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(dead.attempts, 3);
    let (_, attempts) = client.get_task(&flaky.id).await.expect("get");
    assert_eq!(attempts.len(), 3);
    for (i, a) in attempts.iter().enumerate() {
        assert_eq!(a.attempt, i as u32 + 1);
        let expected = format!("gateway timeout #{}", i + 1);
        assert_eq!(a.error.as_deref(), Some(expected.as_str()));
        assert!(a.finished_at.is_some());
    }
    assert_eq!(attempts[0].outcome, "failed");
    assert_eq!(attempts[2].outcome, "terminal");
    let runs: Vec<_> = log
        .runs()
        .into_iter()
        .filter(|r| r.task_id == flaky.id)
        .collect();
    assert_eq!(runs.len(), 3);
    // Backoff is 200 ms then 400 ms, each with ±20 % jitter.
    assert!(runs[1].at - runs[0].at >= chrono::Duration::milliseconds(160));
    assert!(runs[2].at - runs[1].at >= chrono::Duration::milliseconds(320));

    let dead = wait_for_state(
        &mut client,
        &fatal.id,
        TaskState::Dead,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(dead.attempts, 1, "a terminal error is not retried");
    assert_eq!(dead.last_error.as_deref(), Some("card declined"));
}

/// Idempotency: the same key and content return the same task; the same key
/// with other content is ALREADY_EXISTS; neither stores a second task.
async fn idempotency_key_dedupes_and_detects_conflicts(backend: Backend) {
    let stack = Stack::start(backend).await;
    let server = stack.server().await;
    let mut client = client(&server).await;
    let at = Utc::now() + chrono::Duration::hours(1);
    let request = || {
        NewTask::new("mail")
            .payload("welcome")
            .at(at)
            .idempotency_key("signup-42")
    };

    let first = client.schedule(request()).await.expect("first");
    let again = client.schedule(request()).await.expect("repeat");
    assert_eq!(first.id, again.id);
    let err = client
        .schedule(request().payload("other content"))
        .await
        .expect_err("conflict");
    assert_eq!(err.code, tonic::Code::AlreadyExists);
    let results = client
        .schedule_batch(vec![request(), request().payload("changed")])
        .await
        .expect("batch");
    assert_eq!(results[0].as_ref().expect("same task").id, first.id);
    assert_eq!(
        results[1].as_ref().expect_err("conflict").code,
        tonic::Code::AlreadyExists
    );

    let page = client
        .list_tasks(Some("mail"), None, 100, None)
        .await
        .expect("list");
    assert_eq!(page.tasks.len(), 1);
    assert_eq!(stack.stream_state("KAIROS_TASKS").await.0, 1);
}

/// Every kind of invalid input gets the right code and names the field, and
/// nothing is stored: ListTasks and the stream stay empty.
async fn invalid_input_is_rejected_and_nothing_stored(backend: Backend) {
    let stack = Stack::start(backend).await;
    let mut config = stack.config();
    config.max_payload_bytes = 1024;
    config.max_horizon = Duration::from_secs(3600);
    let server = stack.server_with(config).await;
    let mut client = client(&server).await;
    let ok = || NewTask::new("q").delay(Duration::from_secs(60));
    let mut neither = ok();
    neither.due = None;
    let raw = |run_at: bool, delay_s: i64| kairos_proto::v1::ScheduleRequest {
        queue: "q".into(),
        run_at: run_at.then(|| prost_types::Timestamp {
            seconds: Utc::now().timestamp(),
            nanos: 0,
        }),
        delay: Some(prost_types::Duration {
            seconds: delay_s,
            nanos: 0,
        }),
        ..Default::default()
    };

    let invalid = tonic::Code::InvalidArgument;
    let cases: Vec<(&str, NewTask, tonic::Code, &str)> = vec![
        (
            "empty queue",
            NewTask {
                queue: String::new(),
                ..ok()
            },
            invalid,
            "queue",
        ),
        (
            "queue with a dot",
            NewTask {
                queue: "a.b".into(),
                ..ok()
            },
            invalid,
            "queue",
        ),
        (
            "queue with a wildcard",
            NewTask {
                queue: "a*".into(),
                ..ok()
            },
            invalid,
            "queue",
        ),
        (
            "queue too long",
            NewTask {
                queue: "q".repeat(65),
                ..ok()
            },
            invalid,
            "queue",
        ),
        ("neither run_at nor delay", neither, invalid, "run_at"),
        (
            "delay beyond the horizon",
            ok().delay(Duration::from_secs(7200)),
            invalid,
            "delay",
        ),
        (
            "run_at beyond the horizon",
            ok().at(Utc::now() + chrono::Duration::days(2)),
            invalid,
            "run_at",
        ),
        (
            "payload too large",
            ok().payload(vec![7u8; 1025]),
            tonic::Code::ResourceExhausted,
            "payload",
        ),
        (
            "bad header name",
            ok().header("bad name", "v"),
            invalid,
            "headers[bad name]",
        ),
        (
            "header value with a newline",
            ok().header("x", "a\nb"),
            invalid,
            "headers[x]",
        ),
        (
            "zero attempts",
            ok().max_attempts(0),
            invalid,
            "max_attempts",
        ),
        (
            "absurd attempts",
            ok().max_attempts(1_000_000),
            invalid,
            "max_attempts",
        ),
        (
            "empty idempotency key",
            ok().idempotency_key(""),
            invalid,
            "idempotency_key",
        ),
        (
            "zero expire_after",
            ok().expire_after(Duration::ZERO),
            invalid,
            "expire_after",
        ),
    ];
    for (what, task, code, field) in cases {
        let err = client.schedule(task).await.expect_err(what);
        assert_eq!(err.code, code, "{what}: {err}");
        assert_eq!(err.field.as_deref(), Some(field), "{what}: {err}");
    }
    for (what, request) in [
        ("both run_at and delay", raw(true, 5)),
        ("negative delay", raw(false, -5)),
    ] {
        let status = client.raw().schedule(request).await.expect_err(what);
        assert_eq!(status.code(), invalid, "{what}");
        assert!(
            status.message().starts_with("delay"),
            "{what}: {}",
            status.message()
        );
    }
    for id in ["", "not-a-uuid"] {
        let err = client.cancel(id).await.expect_err("bad id");
        assert_eq!((err.code, err.field.as_deref()), (invalid, Some("id")));
        let err = client.get_task(id).await.expect_err("bad id");
        assert_eq!((err.code, err.field.as_deref()), (invalid, Some("id")));
    }
    let err = client
        .get_task(&uuid::Uuid::now_v7().to_string())
        .await
        .expect_err("unknown");
    assert_eq!(err.code, tonic::Code::NotFound);
    let err = client
        .schedule_batch(vec![])
        .await
        .expect_err("empty batch");
    assert_eq!(err.field.as_deref(), Some("tasks"));
    let err = client
        .schedule_batch(vec![ok(); 1001])
        .await
        .expect_err("oversized batch");
    assert_eq!(err.field.as_deref(), Some("tasks"));
    let results = client
        .schedule_batch(vec![
            NewTask {
                queue: "bad queue".into(),
                ..ok()
            },
            ok().max_attempts(0),
        ])
        .await
        .expect("batch of bad items");
    assert_eq!(
        results[0].as_ref().unwrap_err().field.as_deref(),
        Some("queue")
    );
    assert_eq!(
        results[1].as_ref().unwrap_err().field.as_deref(),
        Some("max_attempts")
    );

    let page = client
        .list_tasks(None, None, 100, None)
        .await
        .expect("list");
    assert!(page.tasks.is_empty(), "nothing stored in SQL");
    assert_eq!(
        stack.stream_state("KAIROS_TASKS").await,
        (0, 0),
        "nothing published"
    );
}

/// No cycling: 10,000 tasks due in an hour, held in memory by an open bucket;
/// over 20 s of waiting the stream's message count and sequence do not move.
async fn waiting_tasks_are_not_cycled(backend: Backend) {
    let stack = Stack::start(backend).await;
    let mut config = stack.config();
    config.lookahead = Duration::from_secs(2 * 3600);
    let server = stack.server_with(config).await;
    let mut client = client(&server).await;
    let due = Utc::now() + chrono::Duration::hours(1);
    for _ in 0..10 {
        let batch = (0..1000)
            .map(|i| NewTask::new("later").payload(format!("{i}")).at(due))
            .collect();
        for result in client.schedule_batch(batch).await.expect("batch") {
            result.expect("stored");
        }
    }
    let before = stack.stream_state("KAIROS_TASKS").await;
    assert_eq!(before.0, 10_000);
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(
        stack.stream_state("KAIROS_TASKS").await,
        before,
        "no re-publish while waiting"
    );
    assert_eq!(
        stack.stream_state("KAIROS_READY").await,
        (0, 0),
        "nothing released early"
    );
    let page = client
        .list_tasks(Some("later"), Some(TaskState::Scheduled), 1, None)
        .await
        .expect("list");
    assert!(page.next_page_token.is_some(), "all still scheduled");
}

/// A run as the handler saw it: task id, payload, start.
type Seen = (String, Bytes, DateTime<Utc>);

/// Tasks of a bucket further out than KAIROS_BODY_PREFETCH wait without
/// bodies: pulled headers-only where they were booked with headers, else
/// pulled whole with each body dropped once read. Then the bucket is reloaded
/// with bodies: each task runs once, not early, with its own payload. With no
/// prefetch the reload happens only as the tasks fall due, and still none runs
/// without it.
async fn far_buckets_wait_without_bodies(backend: Backend) {
    for (prefetch, booking_headers) in [
        (Duration::from_secs(2), true),
        (Duration::from_secs(2), false),
        (Duration::ZERO, false),
    ] {
        let case = format!("prefetch {prefetch:?}, booking headers {booking_headers}");
        let stack = Stack::start(backend).await;
        let mut config = stack.config();
        config.bucket_width = Duration::from_secs(1);
        config.lookahead = Duration::from_secs(10);
        config.body_prefetch = prefetch;
        config.booking_headers = booking_headers;
        let server = stack.server_with(config).await;
        let mut client = client(&server).await;
        let (seen, _worker) = record_runs(&stack, &server);

        // Due on a whole second, the start of its one-second bucket, 6 s out.
        let due_ms = (Utc::now().timestamp_millis() / 1000 + 6) * 1000;
        let due = DateTime::from_timestamp_millis(due_ms).expect("due");
        let mut expected = book_payloads(&mut client, 0..500, due).await;

        tokio::time::sleep(Duration::from_millis(1500)).await;
        let stream = tasks_stream(&stack).await;
        let info = stream
            .consumer_info(wire::bucket_consumer(due_ms))
            .await
            .expect("the bucket is open");
        assert_eq!(
            info.config.headers_only, booking_headers,
            "headers-only where they tell the tasks ({case})"
        );
        assert_eq!(info.num_ack_pending, 500, "all held ({case})");

        expect_runs(&seen, &mut expected, due, &case).await;

        // Each bucket message was acknowledged on the subject the dispatcher
        // rebuilt from its shared prefix and numbers: none is left pending (a
        // drained bucket's consumer is deleted, which needs the same).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match stream.consumer_info(wire::bucket_consumer(due_ms)).await {
                Ok(info) if info.num_ack_pending == 0 => break,
                Ok(info) => assert!(
                    tokio::time::Instant::now() < deadline,
                    "{} bucket messages never acknowledged ({case})",
                    info.num_ack_pending
                ),
                Err(err) => {
                    assert_eq!(
                        err.kind(),
                        async_nats::jetstream::context::ConsumerInfoErrorKind::NotFound,
                        "{err}"
                    );
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// While replicas are replaced one by one, tasks booked with headers and
/// without share buckets. A replica that books with headers opens a far
/// bucket headers-only; meeting tasks booked without, it pulls the bucket
/// whole instead (bodies read, then dropped, until the prefetch): every task
/// of both kinds runs once, not early, with its own payload.
async fn bookings_with_and_without_headers_share_a_bucket(backend: Backend) {
    let stack = Stack::start(backend).await;
    let mut config = stack.config();
    config.bucket_width = Duration::from_secs(1);
    config.lookahead = Duration::from_secs(30);
    config.body_prefetch = Duration::from_secs(2);
    let due_ms = (Utc::now().timestamp_millis() / 1000 + 12) * 1000;
    let due = DateTime::from_timestamp_millis(due_ms).expect("due");

    config.booking_headers = false;
    let mut without = stack.server_with(config.clone()).await;
    let mut expected = book_payloads(&mut client(&without).await, 0..300, due).await;
    without.stop().await.expect("stopped");

    config.booking_headers = true;
    let server = stack.server_with(config).await;
    let (seen, _worker) = record_runs(&stack, &server);
    expected.extend(book_payloads(&mut client(&server).await, 300..600, due).await);

    // All held, and pulled with bodies while still far (before the prefetch).
    let stream = tasks_stream(&stack).await;
    loop {
        assert!(
            Utc::now().timestamp_millis() < due_ms - 2_000,
            "the bucket was not pulled lean before its prefetch"
        );
        if let Ok(info) = stream.consumer_info(wire::bucket_consumer(due_ms)).await
            && !info.config.headers_only
            && info.num_ack_pending == 600
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    expect_runs(&seen, &mut expected, due, "mixed bookings").await;
}

/// Records each run a worker of `server` makes on the default queue; the
/// worker runs while its handle is kept.
fn record_runs(stack: &Stack, server: &ServerHandle) -> (Arc<Mutex<Vec<Seen>>>, WorkerHandle) {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let record = Arc::clone(&seen);
    let worker = stack.worker(
        server,
        "default",
        16,
        handler_fn(move |task| {
            let record = Arc::clone(&record);
            async move {
                let run = (task.id().to_owned(), task.payload().clone(), Utc::now());
                record.lock().expect("runs").push(run);
                Ok::<(), HandlerError>(())
            }
        }),
    );
    (seen, worker)
}

/// Books one task per number on the default queue, due at `due`, each with
/// its own payload; returns the payload of each id.
async fn book_payloads(
    client: &mut Client,
    numbers: std::ops::Range<usize>,
    due: DateTime<Utc>,
) -> HashMap<String, Bytes> {
    let payloads: Vec<Bytes> = numbers
        .map(|i| Bytes::from(format!("payload {i}")))
        .collect();
    let batch = payloads
        .iter()
        .map(|payload| NewTask::new("default").payload(payload.clone()).at(due))
        .collect();
    let stored = client.schedule_batch(batch).await.expect("batch");
    stored
        .into_iter()
        .zip(payloads)
        .map(|(result, payload)| (result.expect("stored").id, payload))
        .collect()
}

/// The tasks stream, read behind the servers' backs.
async fn tasks_stream(stack: &Stack) -> async_nats::jetstream::stream::Stream {
    let nats = async_nats::connect(stack.nats.url()).await.expect("nats");
    async_nats::jetstream::new(nats)
        .get_stream(wire::TASKS_STREAM)
        .await
        .expect("stream")
}

/// Waits until every expected task ran, then checks each ran once, not
/// before `due`, with its own payload.
async fn expect_runs(
    seen: &Mutex<Vec<Seen>>,
    expected: &mut HashMap<String, Bytes>,
    due: DateTime<Utc>,
    case: &str,
) {
    let n = expected.len();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.lock().expect("runs").len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not all ran ({case})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let runs = seen.lock().expect("runs").clone();
    assert_eq!(runs.len(), n, "each ran once ({case})");
    for (id, payload, at) in runs {
        assert_eq!(expected.remove(&id), Some(payload), "its own payload, once");
        assert!(at >= due, "ran {at} before due {due}");
    }
}

backend_tests!(
    claims_lost_with_redis_are_decided_by_sql,
    task_runs_once_not_before_due,
    batch_of_2000_runs_each_once_on_time,
    cancel_before_due_never_runs_and_after_finish_fails,
    cancel_racing_dispatch_is_exclusive,
    past_due_runs_at_once_and_expired_never_runs,
    failures_retry_with_backoff_then_dead,
    idempotency_key_dedupes_and_detects_conflicts,
    invalid_input_is_rejected_and_nothing_stored,
    waiting_tasks_are_not_cycled,
    far_buckets_wait_without_bodies,
    bookings_with_and_without_headers_share_a_bucket,
    a_start_is_answered_while_a_result_beside_it_waits_for_its_commit,
);

/// Redis loses its data (FLUSHALL) while tasks wait, and a later booking
/// lands in the same bucket: a task whose claim is gone is decided by SQL,
/// so the waiting one runs once and the one cancelled before the loss never
/// runs. A booking writes no claim per task, only its hash's mark: the mark
/// the later booking sets is younger than the lost tasks' ids, so their
/// missing claims do not count as scheduled (a mark that did would run the
/// cancelled one).
async fn claims_lost_with_redis_are_decided_by_sql(backend: Backend) {
    let stack = Stack::start(backend).await;
    let server = stack.server().await;
    let log = RunLog::default();
    let mut client = client(&server).await;
    let due = Utc::now() + chrono::Duration::seconds(3);
    let tasks = client
        .schedule_batch(vec![
            NewTask::new("default").at(due).payload("keep"),
            NewTask::new("default").at(due).payload("cancelled"),
        ])
        .await
        .expect("batch")
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .expect("each booked");
    client.cancel(&tasks[1].id).await.expect("cancel");
    let mut redis = stack.redis.connect().await;
    let width_ms = stack.config().bucket_width.as_millis() as i64;
    let hash = kairos_server::store::claims::claims_key(kairos_server::domain::bucket_of(
        tasks[0].due_at.timestamp_millis(),
        width_ms,
    ));
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg(&hash)
        .query_async(&mut redis)
        .await
        .expect("hkeys");
    assert_eq!(
        fields.len(),
        2,
        "the mark and the cancel, no claim per booked task: {fields:?}"
    );
    let () = redis::cmd("FLUSHALL")
        .query_async(&mut redis)
        .await
        .expect("flushall");
    let later = client
        .schedule(NewTask::new("default").at(due).payload("later"))
        .await
        .expect("booked after the loss");
    // The same future due time, so the same bucket and claim hash.
    assert_eq!(later.due_at, tasks[1].due_at);
    assert!(Utc::now() < due, "booked before due");
    let _worker = stack.worker(&server, "default", 4, log.handler());

    for task in [&tasks[0], &later] {
        wait_for_state(
            &mut client,
            &task.id,
            TaskState::Succeeded,
            Duration::from_secs(20),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let counts = log.counts();
    assert_eq!(counts.get(&tasks[0].id), Some(&1), "ran once");
    assert_eq!(counts.get(&later.id), Some(&1), "ran once");
    assert_eq!(
        counts.get(&tasks[1].id),
        None,
        "the cancelled one never ran"
    );
    let (cancelled, _) = client.get_task(&tasks[1].id).await.expect("get");
    assert_eq!(cancelled.state, TaskState::Cancelled);
}

/// A worker's message carrying one attempt's result and the next attempt's
/// start: the start is answered once decided, while the result waits for its
/// SQL commit (held back here by the test's own write lock); the run slot
/// the start holds is not kept waiting for another task's commit.
async fn a_start_is_answered_while_a_result_beside_it_waits_for_its_commit(backend: Backend) {
    use kairos_proto::v1 as pb;

    let stack = Stack::start(backend).await;
    let width_ms = stack.config().bucket_width.as_millis() as i64;
    let server = stack.server().await;
    let mut client = client(&server).await;
    let mut tasks = Vec::new();
    for name in ["first", "second"] {
        let task = client
            .schedule(NewTask::new("nobody-works-here").payload(name))
            .await
            .expect("schedule");
        tasks.push(task);
    }
    let started = |seq, task: &Task| pb::Report {
        seq,
        event: Some(pb::report::Event::Started(raw_start(task, 1, width_ms))),
    };
    let succeeded = |seq, task: &Task| pb::Report {
        seq,
        event: Some(pb::report::Event::Finished(raw_success(task, 1, width_ms))),
    };
    let message = |reports| pb::ReportRequest {
        worker_id: "raw".into(),
        reports,
        ..Default::default()
    };
    let (tx, rx) = futures::channel::mpsc::unbounded();
    let mut answers =
        kairos_proto::v1::status_service_client::StatusServiceClient::connect(server.url.clone())
            .await
            .expect("status client")
            .report(rx)
            .await
            .expect("report stream")
            .into_inner();
    let mut next_answer = async move |within: Duration| -> Option<Vec<pb::ReportResponse>> {
        let answer = tokio::time::timeout(within, answers.message()).await.ok()?;
        Some(answer.expect("answer").expect("stream open").answers)
    };
    let run = i32::from(pb::StartDecision::Run);

    tx.unbounded_send(message(vec![started(1, &tasks[0])]))
        .expect("send");
    let first = next_answer(Duration::from_secs(10))
        .await
        .expect("answered");
    assert_eq!((first[0].seq, first[0].decision), (1, run));
    // Its RUNNING row committed, so the lock below holds back only what follows.
    wait_for_state(
        &mut client,
        &tasks[0].id,
        TaskState::Running,
        Duration::from_secs(10),
    )
    .await;

    let lock = stack.hold_sql_writes().await;
    tx.unbounded_send(message(vec![
        succeeded(2, &tasks[0]),
        started(3, &tasks[1]),
    ]))
    .expect("send");
    let decided = next_answer(Duration::from_secs(3))
        .await
        .expect("the start is answered while SQL writes wait");
    let decided: Vec<(u64, i32)> = decided.iter().map(|a| (a.seq, a.decision)).collect();
    assert_eq!(decided, [(3, run)], "only the start, not the result");
    assert!(
        next_answer(Duration::from_millis(500)).await.is_none(),
        "a result is answered only once committed"
    );
    lock.release().await;
    let recorded = next_answer(Duration::from_secs(15))
        .await
        .expect("the result is answered once committed");
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!((recorded[0].seq, recorded[0].error.as_str()), (2, ""));
    let (task, _) = client.get_task(&tasks[0].id).await.expect("get");
    assert_eq!(task.state, TaskState::Succeeded);
}

/// A burst's starts come faster than SQL commits their RUNNING writes. The
/// starts are answered once Redis decided them, whatever the recorder's
/// backlog: here 24,000 of them while the test holds SQLite's write lock, so
/// that nothing is committed at all. Before, a start waited for room in a
/// queue of 16,384 writes, which kept its worker's run slot from the next
/// task for as long as the backlog took to commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_are_answered_while_their_running_writes_wait_for_sql() {
    use kairos_proto::v1 as pb;

    const TASKS: usize = 24_000;
    let stack = Stack::start(Backend::Sqlite).await;
    let width_ms = stack.config().bucket_width.as_millis() as i64;
    let server = stack.server().await;
    let mut client = client(&server).await;
    let mut tasks = Vec::with_capacity(TASKS);
    while tasks.len() < TASKS {
        let batch = (0..1000)
            .map(|_| NewTask::new("nobody-works-here"))
            .collect();
        for result in client.schedule_batch(batch).await.expect("batch") {
            tasks.push(result.expect("stored"));
        }
    }
    let (tx, rx) = futures::channel::mpsc::unbounded();
    let mut answers = pb::status_service_client::StatusServiceClient::connect(server.url.clone())
        .await
        .expect("status client")
        .report(rx)
        .await
        .expect("report stream")
        .into_inner();

    let lock = stack.hold_sql_writes().await;
    let held = tokio::time::Instant::now();
    for (chunk, some) in tasks.chunks(1000).enumerate() {
        let reports = some
            .iter()
            .enumerate()
            .map(|(i, task)| pb::Report {
                seq: (chunk * 1000 + i) as u64,
                event: Some(pb::report::Event::Started(raw_start(task, 1, width_ms))),
            })
            .collect();
        tx.unbounded_send(pb::ReportRequest {
            worker_id: "raw".into(),
            reports,
            ..Default::default()
        })
        .expect("send");
    }
    // Well within SQLite's busy timeout (10 s), after which the held
    // batch would fail and free the queue anyway.
    let deadline = held + Duration::from_secs(8);
    let run = i32::from(pb::StartDecision::Run);
    let mut decided = 0;
    while decided < TASKS {
        let message = tokio::time::timeout_at(deadline, answers.message())
            .await
            .unwrap_or_else(|_| panic!("{decided} of {TASKS} starts answered while SQL waits"))
            .expect("answer")
            .expect("stream open");
        for answer in message.answers {
            assert_eq!(answer.decision, run, "{answer:?}");
            decided += 1;
        }
    }
    eprintln!("{TASKS} starts answered in {:?}", held.elapsed());
    lock.release().await;
    let last = &tasks[TASKS - 1].id;
    wait_for_state(
        &mut client,
        last,
        TaskState::Running,
        Duration::from_secs(30),
    )
    .await;
}

/// Releases due one after another go on while SQL commits nothing: the
/// recorder keeps taking their DISPATCHED writes while its batches wait (here
/// two cancels', behind the test's lock on the tasks table). Before, it took
/// none while its batches committed, and the dispatcher stopped once 16,384
/// waited in its channel; under load that stopped every release for as long
/// as SQL was behind (BENCHMARKS item 52). Postgres waits for the lock as
/// long as it takes, where SQLite would give up after its busy timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_go_on_while_sql_commits_nothing() {
    const TASKS: usize = 24_000;
    let stack = Stack::start(Backend::Postgres).await;
    let server = stack.server().await;
    let mut client = client(&server).await;
    // 10 tasks a millisecond, as in the steady bench: no instant is a burst.
    let first_due = Utc::now() + chrono::Duration::seconds(5);
    let mut booked = 0;
    while booked < TASKS {
        let batch = (booked..booked + 1000)
            .map(|i| {
                NewTask::new("nobody-works-here")
                    .at(first_due + chrono::Duration::milliseconds((i / 10) as i64))
            })
            .collect();
        for result in client.schedule_batch(batch).await.expect("batch") {
            result.expect("stored");
        }
        booked += 1000;
    }
    let later = Utc::now() + chrono::Duration::hours(1);
    let mut to_cancel = Vec::new();
    for _ in 0..2 {
        let task = client
            .schedule(NewTask::new("nobody-works-here").at(later))
            .await
            .expect("schedule");
        to_cancel.push(task.id);
    }
    assert!(Utc::now() < first_due, "booked before the first is due");

    let lock = stack.hold_sql_writes().await;
    let held = tokio::time::Instant::now();
    // Two cancels, one batch each: as many as the recorder applies at once.
    let mut cancels = Vec::new();
    for id in to_cancel {
        let mut cancelling = client.clone();
        cancels.push(tokio::spawn(async move { cancelling.cancel(&id).await }));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Generous: the releases take a few seconds in a debug build.
    let deadline = held + Duration::from_secs(60);
    loop {
        let (ready, _) = stack.stream_state("KAIROS_READY").await;
        if ready as usize == TASKS {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{ready} of {TASKS} released while SQL waits"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        cancels.iter().all(|c| !c.is_finished()),
        "the cancels wait for their commits"
    );
    lock.release().await;
    for cancel in cancels {
        let cancelled = cancel.await.expect("join").expect("cancel");
        assert_eq!(cancelled.state, TaskState::Cancelled);
    }
}

/// A SQLite stack whose server releases tasks 2 s ahead of their due time,
/// with one worker of `slots` on "default" that runs into `log`.
async fn released_ahead_stack(
    slots: usize,
    log: &RunLog,
) -> (Stack, ServerHandle, WorkerHandle, Client) {
    let (stack, server, client) = lead_stack("default", QueueChange::new()).await;
    let worker = stack.worker(&server, "default", slots, log.handler());
    stack.wait_ahead_pulled("default").await;
    (stack, server, worker, client)
}

/// A SQLite stack whose server releases tasks 2 s ahead, with `queue`
/// created with `settings` (and so its two lanes).
async fn lead_stack(queue: &str, settings: QueueChange) -> (Stack, ServerHandle, Client) {
    stack_with_lead(Duration::from_secs(2), queue, settings).await
}

/// A SQLite stack whose server releases tasks `lead` ahead, with `queue`
/// created with `settings`.
async fn stack_with_lead(
    lead: Duration,
    queue: &str,
    settings: QueueChange,
) -> (Stack, ServerHandle, Client) {
    let stack = Stack::start(Backend::Sqlite).await;
    let mut config = stack.config();
    config.release_lead = lead;
    let server = stack.server_with(config).await;
    let mut client = client(&server).await;
    client
        .create_queue(queue, settings)
        .await
        .expect("create queue");
    (stack, server, client)
}

/// Books `n` tasks on `queue`, all due at `instant`, in batches of 1,000;
/// returns each one's due time by id.
async fn book_burst(
    client: &mut Client,
    queue: &str,
    n: usize,
    instant: DateTime<Utc>,
) -> HashMap<String, DateTime<Utc>> {
    let mut due = HashMap::new();
    for first in (0..n).step_by(1000) {
        let tasks = (first..n.min(first + 1000))
            .map(|i| {
                NewTask::new(queue)
                    .payload(format!("burst-{i}"))
                    .at(instant)
            })
            .collect();
        for result in client.schedule_batch(tasks).await.expect("batch") {
            let task = result.expect("item stored");
            due.insert(task.id, task.due_at);
        }
    }
    due
}

/// Waits until every task of `due` ran, then checks each ran once and not
/// before its due time.
async fn each_ran_once_on_time(log: &RunLog, due: &HashMap<String, DateTime<Utc>>) {
    log.wait_for(due.len(), Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts = log.counts();
    assert_eq!(counts.len(), due.len(), "every task ran");
    assert!(counts.values().all(|&n| n == 1), "each task ran once");
    for run in log.runs() {
        assert!(
            run.at >= due[&run.task_id],
            "task {} ran early",
            run.task_id
        );
    }
}

/// Released ahead of its due time (KAIROS_RELEASE_LEAD), a task waits in its
/// queue and in the worker that took it, and starts at its due time, not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_ahead_starts_at_due_time_not_before() {
    let log = RunLog::default();
    let (stack, _server, _worker, mut client) = released_ahead_stack(4, &log).await;

    let task = client
        .schedule(
            NewTask::new("default")
                .payload("ahead")
                .delay(Duration::from_secs(4)),
        )
        .await
        .expect("schedule");
    let one_second_before = (task.due_at - chrono::Duration::seconds(1) - Utc::now())
        .to_std()
        .expect("booked 4 s ahead");
    tokio::time::sleep(one_second_before).await;
    assert_eq!(
        stack.stream_state("KAIROS_READY").await.0,
        1,
        "released 2 s ahead, held unacknowledged by the worker"
    );
    assert!(log.is_empty(), "not started a second before its due time");

    log.wait_for(1, Duration::from_secs(10)).await;
    let runs = log.runs();
    assert!(
        runs[0].at >= task.due_at,
        "started {} before due {}",
        runs[0].at,
        task.due_at
    );
    wait_for_state(
        &mut client,
        &task.id,
        TaskState::Succeeded,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(log.len(), 1, "ran once");
}

/// A task released while no worker pulled its queue's ahead lane yet (the
/// first worker comes within the lead, or the server's read fell between
/// two of a worker's pulls) waits in the dispatcher, and goes ahead as soon
/// as a worker pulls the lane, not only as it falls due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_deferred_before_a_worker_pulls_the_ahead_lane_goes_ahead_once_one_does() {
    let (stack, server, mut client) = lead_stack("default", QueueChange::new()).await;
    let task = client
        .schedule(
            NewTask::new("default")
                .payload("ahead")
                .delay(Duration::from_secs(5)),
        )
        .await
        .expect("schedule");
    let until = |before_ms: i64| {
        (task.due_at - chrono::Duration::milliseconds(before_ms) - Utc::now())
            .to_std()
            .expect("booked 5 s ahead")
    };
    // Past its release (2 s ahead) with nobody pulling: it waits.
    tokio::time::sleep(until(1850)).await;
    assert_eq!(
        stack.stream_state("KAIROS_READY").await.0,
        0,
        "released to nobody"
    );

    let log = RunLog::default();
    let _worker = stack.worker(&server, "default", 4, log.handler());
    stack.wait_ahead_pulled("default").await;
    // Deferred, it would come only 20 ms before its due time.
    let deadline = tokio::time::Instant::now() + until(250);
    while stack.stream_state("KAIROS_READY").await.0 == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still not released 250 ms before its due time, though a worker pulls the ahead lane"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(log.is_empty(), "released ahead, held until its due time");

    log.wait_for(1, Duration::from_secs(10)).await;
    assert!(
        log.runs()[0].at >= task.due_at,
        "started before its due time"
    );
    wait_for_state(
        &mut client,
        &task.id,
        TaskState::Succeeded,
        Duration::from_secs(10),
    )
    .await;
}

/// More tasks deferred than JetStream publishes may await at once (its
/// context allows 20,000): when a worker comes to pull the ahead lane, they
/// all go ahead, in waves, and run at their instant. Published as one wave,
/// the dispatcher waited for ever for a permit it held itself, and none of
/// the later tasks ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_deferred_tasks_than_acks_in_flight_all_go_ahead_once_a_worker_pulls() {
    let (stack, server, mut client) =
        stack_with_lead(Duration::from_secs(5), "default", QueueChange::new()).await;
    let instant = Utc::now() + chrono::Duration::seconds(15);
    let due = book_burst(&mut client, "default", 25_000, instant).await;
    let booked = Utc::now();
    assert!(
        booked < instant - chrono::Duration::seconds(5),
        "booked a full lead ahead (took until {booked})"
    );
    // Released within the lead to nobody, every task is deferred.
    let deferred = (instant - chrono::Duration::seconds(4) - Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(deferred).await;
    assert_eq!(
        stack.stream_state("KAIROS_READY").await.0,
        0,
        "released to nobody"
    );

    let log = RunLog::default();
    let _worker = stack.worker(&server, "default", 64, log.handler());
    each_ran_once_on_time(&log, &due).await;
}

/// A task cancelled after it reached its queue (held by a worker until its
/// due time) is skipped by its start claim, the only claim a release leaves
/// to decide it, and stays CANCELLED with no attempt; its message leaves the
/// queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_after_release_is_skipped_at_its_start() {
    let log = RunLog::default();
    let (stack, _server, _worker, mut client) = released_ahead_stack(4, &log).await;

    let (doomed, kept) = doomed_and_kept(&mut client, Duration::from_secs(4)).await;
    let one_second_before = (doomed.due_at - chrono::Duration::seconds(1) - Utc::now())
        .to_std()
        .expect("booked 4 s ahead");
    tokio::time::sleep(one_second_before).await;
    assert_eq!(
        stack.stream_state("KAIROS_READY").await.0,
        2,
        "both released, held by the worker"
    );
    let cancelled = client.cancel(&doomed.id).await.expect("cancel");
    assert_eq!(cancelled.state, TaskState::Cancelled);
    let attempts = cancelled_never_ran(&mut client, &log, &doomed, &kept).await;
    assert!(attempts.is_empty(), "no attempt recorded: {attempts:?}");
    assert_eq!(
        stack.stream_state("KAIROS_READY").await.0,
        0,
        "the skipped copy was acknowledged"
    );
}

/// A burst due at one instant is released whole within KAIROS_RELEASE_LEAD,
/// ahead of the instant; its workers hold what they took, and every task
/// still runs once, not before its due time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_released_ahead_and_runs_at_its_instant() {
    let log = RunLog::default();
    let (stack, _server, _worker, mut client) = released_ahead_stack(16, &log).await;

    let due_at = Utc::now() + chrono::Duration::seconds(4);
    let due = book_burst(&mut client, "default", 200, due_at).await;
    let one_second_before = (due_at - chrono::Duration::seconds(1) - Utc::now())
        .to_std()
        .expect("booked 4 s ahead");
    tokio::time::sleep(one_second_before).await;
    assert_eq!(
        stack.stream_state("KAIROS_READY").await.0,
        200,
        "the whole burst released 2 s ahead"
    );
    assert!(log.is_empty(), "none started a second before the due time");
    let mut dispatched = 0;
    for id in due.keys() {
        let (task, _) = client.get_task(id).await.expect("get");
        dispatched += usize::from(task.state == TaskState::Dispatched);
    }
    // Beyond its first 64, a burst's releases ahead are recorded at once,
    // not when each task starts.
    assert!(
        dispatched >= 200 - 64,
        "{dispatched} of 200 shown DISPATCHED"
    );

    each_ran_once_on_time(&log, &due).await;
}

/// A burst larger than the release lead can carry (40,000 at one instant;
/// the dispatcher plans 25 a millisecond) starts to leave 1.6 s earlier
/// than the lead; none of it starts early, and each task runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_too_large_for_the_lead_starts_to_leave_earlier() {
    let log = RunLog::default();
    let (stack, _server, _worker, mut client) = released_ahead_stack(16, &log).await;

    // Room for booking 40,000 on a slow machine before the early start.
    let instant = Utc::now() + chrono::Duration::seconds(25);
    let due = book_burst(&mut client, "default", 40_000, instant).await;
    let until = |at: DateTime<Utc>| (at - Utc::now()).to_std().expect("still ahead");
    tokio::time::sleep(until(instant - chrono::Duration::milliseconds(2300))).await;
    let released = stack.stream_state("KAIROS_READY").await.0;
    assert!(
        released > 0,
        "nothing released 2.3 s ahead, before the 2 s lead"
    );
    assert!(log.is_empty(), "none started ahead of the instant");
    tokio::time::sleep(until(instant - chrono::Duration::milliseconds(200))).await;
    assert!(log.is_empty(), "none started ahead of the instant");

    log.wait_for(due.len(), Duration::from_secs(120)).await;
    each_ran_once_on_time(&log, &due).await;
}

/// A burst's early start reaches only queues whose ahead lane a worker
/// pulls: elsewhere a task released early would wait with a run slot (and
/// keep tasks due sooner waiting), so it leaves as it falls due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_for_a_queue_without_an_ahead_lane_leaves_as_it_falls_due() {
    let (stack, _server, mut client) = lead_stack("legacy", QueueChange::new()).await;

    // Room for booking 40,000 on a slow machine before the early start.
    let instant = Utc::now() + chrono::Duration::seconds(25);
    book_burst(&mut client, "legacy", 40_000, instant).await;
    let until = |at: DateTime<Utc>| (at - Utc::now()).to_std().expect("still ahead");
    tokio::time::sleep(until(instant - chrono::Duration::milliseconds(300))).await;
    assert_eq!(
        stack.stream_state("KAIROS_READY").await.0,
        0,
        "released before it fell due to a queue whose ahead lane nobody pulls"
    );
    tokio::time::sleep(until(instant + chrono::Duration::milliseconds(1000))).await;
    assert!(
        stack.stream_state("KAIROS_READY").await.0 > 0,
        "released as it fell due"
    );
}

/// A task booked late (within the release lead) for an instant before a
/// burst that already went ahead does not wait behind that burst: the burst
/// waits in the queue's ahead lane and in its worker's hold without run
/// slots, and the late task comes on the queue's own subject and starts at
/// its due time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_booking_does_not_wait_behind_a_burst_released_ahead() {
    let log = RunLog::default();
    let (stack, _server, _worker, mut client) = released_ahead_stack(4, &log).await;

    let instant = Utc::now() + chrono::Duration::seconds(4);
    let mut due = book_burst(&mut client, "default", 1000, instant).await;
    let until = |at: DateTime<Utc>| (at - Utc::now()).to_std().expect("still ahead");
    tokio::time::sleep(until(instant - chrono::Duration::milliseconds(1500))).await;
    let late = client
        .schedule(
            NewTask::new("default")
                .payload("late")
                .at(instant - chrono::Duration::milliseconds(500)),
        )
        .await
        .expect("late booking");
    due.insert(late.id.clone(), late.due_at);

    tokio::time::sleep(until(instant - chrono::Duration::milliseconds(200))).await;
    let runs = log.runs();
    assert_eq!(
        runs.iter().map(|r| r.task_id.as_str()).collect::<Vec<_>>(),
        [late.id.as_str()],
        "only the late task ran before the burst's instant"
    );
    assert!(runs[0].at >= late.due_at, "the late task ran early");
    let ahead = stack.ready_consumer(&wire::ahead_consumer("default")).await;
    assert_eq!(
        ahead.num_ack_pending, 1000,
        "the burst is held by the worker, from the ahead lane"
    );

    each_ran_once_on_time(&log, &due).await;
}

/// A release JetStream refused is retried a second later; by then the task
/// is due, and it comes on the due lane, not the ahead lane its first try
/// was for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_retried_after_its_due_time_comes_on_the_due_lane() {
    let log = RunLog::default();
    let (stack, _server, _worker, mut client) = released_ahead_stack(4, &log).await;

    stack.set_ready_max_message_size(1).await;
    let task = client
        .schedule(
            NewTask::new("default")
                .payload("refused")
                .delay(Duration::from_secs(4)),
        )
        .await
        .expect("schedule");
    let after_due = (task.due_at + chrono::Duration::milliseconds(300) - Utc::now())
        .to_std()
        .expect("booked 4 s ahead");
    tokio::time::sleep(after_due).await;
    assert!(log.is_empty(), "refused releases ran nothing");
    stack.set_ready_max_message_size(-1).await;

    log.wait_for(1, Duration::from_secs(10)).await;
    assert!(log.runs()[0].at >= task.due_at, "ran early");
    let due_lane = stack.ready_consumer(&wire::queue_consumer("default")).await;
    let ahead = stack.ready_consumer(&wire::ahead_consumer("default")).await;
    assert_eq!(
        (
            due_lane.delivered.stream_sequence,
            ahead.delivered.stream_sequence
        ),
        (1, 0),
        "the retry came on the due lane"
    );
}

/// A worker that knows only the queue's own subject (an older worker, or
/// one in another language) never pulls the ahead lane; a task booked a
/// full lead ahead reaches it on the queue's subject, as it falls due
/// rather than a lead early (it would hold a run slot all that while).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_ahead_reaches_a_worker_that_pulls_only_the_queue_subject() {
    use async_nats::jetstream::consumer::PullConsumer;

    let (stack, _server, mut client) = lead_stack("legacy", QueueChange::new()).await;
    let task = client
        .schedule(
            NewTask::new("legacy")
                .payload("old worker")
                .delay(Duration::from_secs(4)),
        )
        .await
        .expect("schedule");

    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await.expect("nats"));
    let consumer: PullConsumer = js
        .get_stream(wire::READY_STREAM)
        .await
        .expect("stream")
        .get_consumer(&wire::queue_consumer("legacy"))
        .await
        .expect("the queue's consumer");
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(6))
        .messages()
        .await
        .expect("pull");
    use futures::StreamExt as _;
    let msg = batch
        .next()
        .await
        .expect("a message before the pull expired")
        .expect("message");
    let early = task.due_at - Utc::now();
    assert!(
        early < chrono::Duration::milliseconds(500),
        "released {early} before its due time, not as it fell due"
    );
    assert_eq!(msg.subject.as_str(), wire::ready_subject("legacy"));
    let ahead = stack.ready_consumer(&wire::ahead_consumer("legacy")).await;
    assert_eq!(ahead.num_pending + ahead.num_ack_pending as u64, 0);
}

/// A limited queue has no ahead lane: a task booked a full lead ahead goes
/// to its queue's subject only as it falls due, so it never holds the
/// limit's permit while a task booked later but due sooner waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_limited_queue_a_task_due_later_does_not_keep_one_due_sooner_waiting() {
    let one = QueueChange::new().max_concurrency(1);
    let (stack, server, mut client) = lead_stack("gate", one).await;
    let log = RunLog::default();
    let _worker = stack.worker(&server, "gate", 4, log.handler());
    let later_at = Utc::now() + chrono::Duration::seconds(4);
    let later = client
        .schedule(NewTask::new("gate").payload("later").at(later_at))
        .await
        .expect("schedule later");
    // Within the later task's lead: it would have gone to the worker by now.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let sooner = client
        .schedule(
            NewTask::new("gate")
                .payload("sooner")
                .at(later_at - chrono::Duration::seconds(1)),
        )
        .await
        .expect("schedule sooner");
    log.wait_for(2, Duration::from_secs(10)).await;
    let runs = log.runs();
    assert_eq!(
        runs.iter().map(|r| r.task_id.as_str()).collect::<Vec<_>>(),
        [sooner.id.as_str(), later.id.as_str()],
        "in due order"
    );
    let late = runs[0].at - sooner.due_at;
    assert!(
        late < chrono::Duration::milliseconds(600),
        "the sooner task ran {late} late"
    );
    assert!(runs.iter().all(|r| r.at >= r.due_at), "ran early");
}

/// Tasks held longer than a third of their queue's run timeout (released
/// 2 s ahead on a queue with a 1 s run timeout, then waiting for the one run
/// slot, which a 1.5 s handler keeps) are kept alive while held: none is
/// delivered again, and each runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_tasks_outlasting_the_run_timeout_are_not_delivered_again() {
    let brief = QueueChange::new().run_timeout(Duration::from_secs(1));
    let (stack, server, mut client) = lead_stack("brief", brief).await;
    let log = RunLog::default();
    let slow = log.slow_handler(Duration::from_millis(1500));
    let _worker = stack.worker(&server, "brief", 1, slow);
    stack.wait_ahead_pulled("brief").await;
    // Settings reach a worker within its 2 s refresh.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let due_at = Utc::now() + chrono::Duration::seconds(4);
    let mut ids = Vec::new();
    for i in 0..2 {
        let task = client
            .schedule(NewTask::new("brief").payload(format!("{i}")).at(due_at))
            .await
            .expect("schedule");
        ids.push(task.id);
    }
    for id in &ids {
        wait_for_state(
            &mut client,
            id,
            TaskState::Succeeded,
            Duration::from_secs(15),
        )
        .await;
    }
    let ahead = stack.ready_consumer(&wire::ahead_consumer("brief")).await;
    assert_eq!(ahead.config.ack_wait, Duration::from_secs(1));
    assert_eq!(
        ahead.delivered.stream_sequence, 2,
        "both went through the ahead lane"
    );
    assert_eq!(
        ahead.delivered.consumer_sequence, 2,
        "held up to 3.5 s with a 1 s run timeout, each delivered once"
    );
    assert_eq!(log.len(), 2, "each ran once");
}

/// A queue given a concurrency limit keeps one consumer, over both of its
/// subjects: the ahead lane's consumer goes, and what waited in that lane
/// still runs, once. Lifting the limit brings the second lane back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_folds_the_ahead_lane_into_the_queue_consumer() {
    let change = QueueChange::new;
    let (stack, server, mut client) = lead_stack("gateway", change()).await;
    let log = RunLog::default();
    // Holds one task; the others wait in the ahead lane.
    let worker = kairos_worker::Worker::builder()
        .server(server.url.clone())
        .nats(stack.nats.url())
        .queue("gateway", log.handler())
        .concurrency(1)
        .hold(1)
        .build()
        .expect("worker config");
    let _worker = stack.spawn_worker(worker);
    stack.wait_ahead_pulled("gateway").await;

    let due_at = Utc::now() + chrono::Duration::seconds(4);
    let tasks = (0..6)
        .map(|i| NewTask::new("gateway").payload(format!("{i}")).at(due_at))
        .collect();
    for result in client.schedule_batch(tasks).await.expect("batch") {
        result.expect("item stored");
    }
    tokio::time::sleep(
        (due_at - chrono::Duration::seconds(1) - Utc::now())
            .to_std()
            .expect("ahead"),
    )
    .await;
    let ahead = stack.ready_consumer(&wire::ahead_consumer("gateway")).await;
    assert_eq!(
        ahead.num_pending + ahead.num_ack_pending as u64,
        6,
        "all six in the ahead lane"
    );

    client
        .update_queue("gateway", change().max_concurrency(1))
        .await
        .expect("limit");
    let queue_consumer = stack.ready_consumer(&wire::queue_consumer("gateway")).await;
    assert_eq!(
        queue_consumer.config.filter_subjects,
        [
            wire::ready_subject("gateway"),
            wire::ahead_subject("gateway")
        ]
    );
    log.wait_for(6, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts = log.counts();
    assert_eq!(counts.len(), 6, "every task ran");
    assert!(
        counts.values().all(|&n| n == 1),
        "each task ran once: {counts:?}"
    );

    client
        .update_queue("gateway", change().max_concurrency(0))
        .await
        .expect("no limit");
    let queue_consumer = stack.ready_consumer(&wire::queue_consumer("gateway")).await;
    assert_eq!(
        queue_consumer.config.filter_subject,
        wire::ready_subject("gateway")
    );
    assert!(queue_consumer.config.filter_subjects.is_empty());
    stack.wait_ahead_pulled("gateway").await;
}

/// A start of `attempt` of `task` (booked on "nobody-works-here"), as a
/// worker would report it.
fn raw_start(task: &Task, attempt: u32, width_ms: i64) -> kairos_proto::v1::AttemptStarted {
    kairos_proto::v1::AttemptStarted {
        task_id: task.id.clone(),
        attempt,
        bucket_ms: kairos_server::domain::bucket_of(task.due_at.timestamp_millis(), width_ms),
        due_at_ms: task.due_at.timestamp_millis(),
        queue: "nobody-works-here".into(),
        ..Default::default()
    }
}

/// The success of `attempt` of `task`, as a worker would report it.
fn raw_success(task: &Task, attempt: u32, width_ms: i64) -> kairos_proto::v1::AttemptFinished {
    kairos_proto::v1::AttemptFinished {
        task_id: task.id.clone(),
        attempt,
        bucket_ms: kairos_server::domain::bucket_of(task.due_at.timestamp_millis(), width_ms),
        result: kairos_proto::v1::AttemptResult::Succeeded.into(),
        ..Default::default()
    }
}

/// Sends one message on a fresh Report stream, as a worker would, and
/// returns the server's first answer.
async fn first_answer(
    server: &str,
    request: kairos_proto::v1::ReportRequest,
) -> kairos_proto::v1::ReportResponse {
    let mut status =
        kairos_proto::v1::status_service_client::StatusServiceClient::connect(server.to_owned())
            .await
            .expect("status client");
    let mut answers = status
        .report(futures::stream::iter([request]))
        .await
        .expect("report stream")
        .into_inner();
    answers
        .message()
        .await
        .expect("answer")
        .expect("one answer")
}

/// A worker whose clock runs ahead asks to start before the due time: the
/// server answers WAIT for the time left and claims nothing, so the task can
/// still be cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_asked_before_due_waits_and_claims_nothing() {
    use kairos_proto::v1 as pb;

    let stack = Stack::start(Backend::Sqlite).await;
    let server = stack.server().await;
    let mut client = client(&server).await;
    let task = client
        .schedule(
            NewTask::new("nobody-works-here")
                .payload("early")
                .delay(Duration::from_secs(30)),
        )
        .await
        .expect("schedule");

    let start = pb::ReportRequest {
        seq: 1,
        worker_id: "early-clock".into(),
        event: Some(pb::report_request::Event::Started(pb::AttemptStarted {
            task_id: task.id.clone(),
            attempt: 1,
            due_at_ms: task.due_at.timestamp_millis(),
            queue: "nobody-works-here".into(),
            ..Default::default()
        })),
        ..Default::default()
    };
    let answer = first_answer(&server.url, start).await;
    assert_eq!(answer.decision, i32::from(pb::StartDecision::Wait));
    assert_eq!(answer.reason, "not due yet");
    let wait = answer.wait.expect("a wait");
    let wait_ms = wait.seconds * 1000 + i64::from(wait.nanos) / 1_000_000;
    assert!(
        (25_000..=30_000).contains(&wait_ms),
        "waits the time left, not {wait_ms} ms"
    );

    let cancelled = client.cancel(&task.id).await.expect("still cancellable");
    assert_eq!(cancelled.state, TaskState::Cancelled);
}

/// A success is recorded in SQL only: its Redis claim stays at the started
/// attempt. A later attempt's start (a redelivery) then asks SQL: after a
/// success it is skipped; after an attempt whose worker was lost it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_attempt_runs_only_when_the_earlier_did_not_succeed() {
    use kairos_proto::v1 as pb;
    use redis::AsyncCommands as _;

    let stack = Stack::start(Backend::Sqlite).await;
    let width_ms = stack.config().bucket_width.as_millis() as i64;
    let server = stack.server().await;
    let mut client = client(&server).await;
    let mut redis = stack.redis.connect().await;
    let bucket =
        |task: &Task| kairos_server::domain::bucket_of(task.due_at.timestamp_millis(), width_ms);
    let report = |event| pb::ReportRequest {
        seq: 1,
        worker_id: "raw".into(),
        event: Some(event),
        ..Default::default()
    };
    let started = |task: &Task, attempt| {
        report(pb::report_request::Event::Started(raw_start(
            task, attempt, width_ms,
        )))
    };
    let succeeded = |task: &Task, attempt| {
        report(pb::report_request::Event::Finished(raw_success(
            task, attempt, width_ms,
        )))
    };
    let claim = async |redis: &mut redis::aio::MultiplexedConnection, task: &Task| -> String {
        redis
            .hget(
                kairos_server::store::claims::claims_key(bucket(task)),
                &task.id,
            )
            .await
            .expect("hget")
    };
    let run = i32::from(pb::StartDecision::Run);
    let skip = i32::from(pb::StartDecision::Skip);

    // Succeeded, then delivered again (its acknowledgement lost).
    let done = client
        .schedule(NewTask::new("nobody-works-here").payload("done"))
        .await
        .expect("schedule");
    assert_eq!(
        first_answer(&server.url, started(&done, 1)).await.decision,
        run
    );
    let answer = first_answer(&server.url, succeeded(&done, 1)).await;
    assert_eq!(answer.error, "", "result recorded");
    assert_eq!(
        claim(&mut redis, &done).await,
        "R1",
        "the success is not claimed in Redis"
    );
    let again = first_answer(&server.url, started(&done, 2)).await;
    assert_eq!(again.decision, skip, "a succeeded task never runs again");
    assert_eq!(again.reason, "task is succeeded");
    let (task, attempts) = client.get_task(&done.id).await.expect("get");
    assert_eq!(task.state, TaskState::Succeeded);
    assert_eq!(attempts.len(), 1);

    // Its worker lost mid-attempt: the next delivery runs.
    let lost = client
        .schedule(NewTask::new("nobody-works-here").payload("lost"))
        .await
        .expect("schedule");
    assert_eq!(
        first_answer(&server.url, started(&lost, 1)).await.decision,
        run
    );
    assert_eq!(
        first_answer(&server.url, started(&lost, 2)).await.decision,
        run
    );
    assert_eq!(claim(&mut redis, &lost).await, "R2");
    assert_eq!(
        first_answer(&server.url, started(&lost, 2)).await.decision,
        skip,
        "once per attempt"
    );
    let answer = first_answer(&server.url, succeeded(&lost, 2)).await;
    assert_eq!(answer.error, "", "result recorded");
    let (task, attempts) = client.get_task(&lost.id).await.expect("get");
    assert_eq!(task.state, TaskState::Succeeded);
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[1].outcome, "succeeded");
}

/// A worker names itself only in its stream's first message and sends the
/// reports it has ready in one: every attempt is still recorded under its
/// name. Raw reports sent in one message are answered in one, by seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_sent_together_are_answered_together_under_the_worker_name() {
    use kairos_proto::v1 as pb;

    let stack = Stack::start(Backend::Sqlite).await;
    let server = stack.server().await;
    let mut client = client(&server).await;
    let log = RunLog::default();
    let _worker = stack.worker(&server, "named", 64, log.handler());
    let mut ids = Vec::new();
    for i in 0..100 {
        let task = client
            .schedule(NewTask::new("named").payload(format!("task {i}")))
            .await
            .expect("schedule");
        ids.push(task.id);
    }
    log.wait_for(100, Duration::from_secs(30)).await;
    let ran_by: HashMap<String, String> = log
        .runs()
        .into_iter()
        .map(|run| (run.task_id, run.worker_id))
        .collect();
    for id in &ids {
        wait_for_state(
            &mut client,
            id,
            TaskState::Succeeded,
            Duration::from_secs(10),
        )
        .await;
        let (_, attempts) = client.get_task(id).await.expect("get");
        assert_eq!(attempts.len(), 1);
        assert_eq!(attempts[0].worker_id, ran_by[id], "task {id}");
    }

    let mut later = Vec::new();
    for _ in 0..2 {
        let task = client
            .schedule(
                NewTask::new("nobody-works-here")
                    .payload("later")
                    .delay(Duration::from_secs(30)),
            )
            .await
            .expect("schedule");
        later.push(task);
    }
    let reports = later
        .iter()
        .zip(1u64..)
        .map(|(task, seq)| pb::Report {
            seq,
            event: Some(pb::report::Event::Started(pb::AttemptStarted {
                task_id: task.id.clone(),
                attempt: 1,
                due_at_ms: task.due_at.timestamp_millis(),
                queue: "nobody-works-here".into(),
                ..Default::default()
            })),
        })
        .collect();
    let together = pb::ReportRequest {
        worker_id: "raw".into(),
        reports,
        ..Default::default()
    };
    let answer = first_answer(&server.url, together).await;
    let mut seqs: Vec<u64> = answer.answers.iter().map(|a| a.seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, [1, 2], "both answered in one message: {answer:?}");
    assert!(
        answer
            .answers
            .iter()
            .all(|a| a.decision == i32::from(pb::StartDecision::Wait)),
        "not due yet: {answer:?}"
    );
}

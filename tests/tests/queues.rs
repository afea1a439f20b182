//! Queues: global concurrency across workers, pause and resume, retry
//! policy, run timeout, live settings changes and bad requests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use kairos_client::{Client, NewTask, QueueChange, TaskState};
use kairos_tests::stack::{client, wait_all_succeeded, wait_for_state};
use kairos_tests::{Backend, RunLog, Stack, backend_tests};
use kairos_worker::{HandlerError, handler_fn};

/// Counts handlers running at once, across every worker of a test.
#[derive(Debug, Clone, Default)]
struct Gauge {
    now: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    done: Arc<AtomicUsize>,
}

impl Gauge {
    /// A handler that holds its slot for `hold`.
    fn handler(&self, hold: Duration) -> impl kairos_worker::Handler {
        let gauge = self.clone();
        handler_fn(move |_task| {
            let gauge = gauge.clone();
            async move {
                let running = gauge.now.fetch_add(1, Ordering::SeqCst) + 1;
                gauge.peak.fetch_max(running, Ordering::SeqCst);
                tokio::time::sleep(hold).await;
                gauge.now.fetch_sub(1, Ordering::SeqCst);
                gauge.done.fetch_add(1, Ordering::SeqCst);
                Ok::<(), HandlerError>(())
            }
        })
    }

    async fn wait_done(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.done.load(Ordering::SeqCst) < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} done",
                self.done.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// When each attempt of a handler started.
type Starts = Arc<Mutex<Vec<Instant>>>;

/// A handler that fails its first two attempts with `error`, then succeeds,
/// and the start time of each attempt.
fn failing_twice(error: &'static str) -> (Starts, impl kairos_worker::Handler) {
    let starts = Starts::default();
    let seen = starts.clone();
    let handler = handler_fn(move |task| {
        let seen = seen.clone();
        async move {
            seen.lock().expect("starts").push(Instant::now());
            if task.attempt() < 3 {
                return Err(HandlerError::retryable(error));
            }
            Ok(())
        }
    });
    (starts, handler)
}

async fn book_now(client: &mut Client, queue: &str, n: usize) -> Vec<String> {
    let batch = (0..n)
        .map(|i| {
            NewTask::new(queue)
                .payload(format!("{i}"))
                .delay(Duration::ZERO)
        })
        .collect();
    client
        .schedule_batch(batch)
        .await
        .expect("batch")
        .into_iter()
        .map(|r| r.expect("booked").id)
        .collect()
}

/// The billing job: a gateway that takes 2 charges at once. Three workers,
/// each with 8 local slots, never run more than 2 together; 20 one-second
/// charges take about 10 s and all succeed.
async fn global_concurrency_holds_across_workers(backend: Backend) {
    let stack = Stack::start(backend).await;
    let server = stack.server().await;
    let mut client = client(&server).await;
    let queue = client
        .create_queue("billing", QueueChange::new().max_concurrency(2))
        .await
        .expect("create");
    assert_eq!(queue.max_concurrency, 2);

    let gauge = Gauge::default();
    let _workers: Vec<_> = (0..3)
        .map(|_| stack.worker(&server, "billing", 8, gauge.handler(Duration::from_secs(1))))
        .collect();
    let started = Instant::now();
    let ids = book_now(&mut client, "billing", 20).await;
    gauge.wait_done(20, Duration::from_secs(40)).await;
    let took = started.elapsed();
    assert!(
        gauge.peak.load(Ordering::SeqCst) <= 2,
        "peak {:?}",
        gauge.peak
    );
    assert_eq!(gauge.peak.load(Ordering::SeqCst), 2, "both slots were used");
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(16),
        "20 one-second charges two at a time took {took:?}"
    );
    wait_all_succeeded(&mut client, &ids, Duration::from_secs(10)).await;
}

/// A rate limit of 5 per second with 50 tasks due at once: they start over
/// about 10 s, never more than the rate allows in any second, and none is dropped.
async fn rate_limit_spreads_starts_and_drops_none(backend: Backend) {
    let stack = Stack::start(backend).await;
    let server = stack.server().await;
    let mut client = client(&server).await;
    let queue = client
        .create_queue("sms", QueueChange::new().rate_limit(5.0, 1))
        .await
        .expect("create");
    assert_eq!((queue.rate_limit, queue.rate_burst), (5.0, 1));
    let starts = Arc::new(Mutex::new(Vec::new()));
    let handler = {
        let starts = starts.clone();
        handler_fn(move |_task| {
            let starts = starts.clone();
            async move {
                starts.lock().expect("starts").push(Instant::now());
                Ok::<(), HandlerError>(())
            }
        })
    };
    let _workers: Vec<_> = (0..3)
        .map(|_| stack.worker(&server, "sms", 8, handler.clone()))
        .collect();
    let ids = book_now(&mut client, "sms", 50).await;
    wait_all_succeeded(&mut client, &ids, Duration::from_secs(30)).await;
    let mut starts = starts.lock().expect("starts").clone();
    starts.sort();
    assert_eq!(starts.len(), 50, "each ran once, none dropped");
    let spread = starts[49] - starts[0];
    assert!(
        spread >= Duration::from_millis(9000) && spread < Duration::from_secs(15),
        "50 starts at 5/s spread over {spread:?}"
    );
    for (i, first) in starts.iter().enumerate() {
        let in_window = starts[i..]
            .iter()
            .take_while(|t| **t - *first < Duration::from_secs(1))
            .count();
        assert!(in_window <= 6, "{in_window} starts within one second");
    }
}

/// A paused queue releases nothing: due tasks wait and show as waiting;
/// resume releases them oldest first.
async fn pause_holds_due_tasks_and_resume_releases_them_in_order(backend: Backend) {
    let stack = Stack::start(backend).await;
    let server = stack.server().await;
    let mut client = client(&server).await;
    client
        .create_queue("mail", QueueChange::new())
        .await
        .expect("create");
    let paused = client.pause_queue("mail").await.expect("pause");
    assert!(paused.paused);

    let log = RunLog::default();
    let _worker = stack.worker(&server, "mail", 1, log.handler());
    let base = Utc::now() + chrono::Duration::milliseconds(800);
    let mut ids = Vec::new();
    // Booked in reverse, so due order is not booking order.
    for i in (0..5).rev() {
        let task = client
            .schedule(
                NewTask::new("mail")
                    .payload(format!("{i}"))
                    .at(base + chrono::Duration::milliseconds(150 * i)),
            )
            .await
            .expect("book");
        ids.push((i, task.id));
    }
    ids.sort();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        log.is_empty(),
        "a paused queue released {} tasks",
        log.len()
    );
    let (queue, stats) = client.get_queue("mail").await.expect("get");
    assert!(queue.paused);
    assert_eq!(stats.waiting, 5, "{stats:?}");
    assert_eq!(stats.scheduled, 0);
    assert!(stats.oldest_waiting_lateness.unwrap_or_default() >= Duration::from_secs(1));

    client.resume_queue("mail").await.expect("resume");
    log.wait_for(5, Duration::from_secs(15)).await;
    let ran: Vec<String> = log.runs().into_iter().map(|r| r.task_id).collect();
    let due_order: Vec<String> = ids.into_iter().map(|(_, id)| id).collect();
    assert_eq!(ran, due_order, "released oldest first");
    // The last handler has run; its start and result are recorded just after.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stats = client.get_queue("mail").await.expect("get").1;
    while stats.waiting != 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        stats = client.get_queue("mail").await.expect("get").1;
    }
    assert_eq!(stats.waiting, 0);
}

/// A handler failing twice then succeeding: three attempts, with at least
/// the queue's backoff between them (1 s, then 2 s with multiplier 2).
async fn retries_follow_the_queue_backoff(backend: Backend) {
    let stack = Stack::start(backend).await;
    let server = stack.server().await;
    let mut client = client(&server).await;
    client
        .create_queue(
            "flaky",
            QueueChange::new().max_attempts(4).backoff(
                Duration::from_secs(1),
                Duration::from_secs(10),
                2.0,
                0.0,
            ),
        )
        .await
        .expect("create");
    let (starts, handler) = failing_twice("gateway timeout");
    let _worker = stack.worker(&server, "flaky", 2, handler);
    let task = client
        .schedule(NewTask::new("flaky").payload("charge"))
        .await
        .expect("book");
    assert_eq!(task.max_attempts, 4, "the queue's attempts apply");
    let done = wait_for_state(
        &mut client,
        &task.id,
        TaskState::Succeeded,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(done.attempts, 3);
    let (_, attempts) = client.get_task(&task.id).await.expect("get");
    let outcomes: Vec<&str> = attempts.iter().map(|a| a.outcome).collect();
    assert_eq!(outcomes, ["failed", "failed", "succeeded"]);
    assert!(attempts[0].error.as_deref() == Some("gateway timeout"));
    let starts = starts.lock().expect("starts").clone();
    assert_eq!(starts.len(), 3);
    let first_gap = starts[1] - starts[0];
    let second_gap = starts[2] - starts[1];
    assert!(
        first_gap >= Duration::from_millis(950),
        "first backoff {first_gap:?}"
    );
    assert!(
        second_gap >= Duration::from_millis(1950),
        "second backoff {second_gap:?}"
    );
    let (_, stats) = client.get_queue("flaky").await.expect("stats");
    assert_eq!(stats.failed_last_hour, 2);
    assert_eq!(stats.succeeded_last_hour, 1);
}

/// A worker killed mid-task: its handler stops with it, and the task is
/// delivered again once the queue's run timeout passes, and completes. A
/// long task on a live worker keeps its delivery with in-progress acks and
/// runs once.
async fn run_timeout_redelivers_only_what_a_dead_worker_held(backend: Backend) {
    let stack = Stack::start(backend).await;
    let server = stack.server().await;
    let mut client = client(&server).await;
    client
        .create_queue(
            "jobs",
            QueueChange::new().run_timeout(Duration::from_secs(2)),
        )
        .await
        .expect("create");

    let hung = RunLog::default();
    let alive = Arc::new(());
    let mut doomed = stack.worker(&server, "jobs", 1, hung.hanging_handler(alive.clone()));
    let task = client
        .schedule(NewTask::new("jobs").payload("stuck"))
        .await
        .expect("book");
    hung.wait_for(1, Duration::from_secs(10)).await;
    let killed_at = Instant::now();
    doomed.kill().await;
    // The handler goes with its worker, not left running detached.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Arc::strong_count(&alive) > 1 {
        assert!(
            Instant::now() < deadline,
            "the killed worker's handler is still running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let log = RunLog::default();
    let _healthy = stack.worker(&server, "jobs", 1, log.handler());
    log.wait_for(1, Duration::from_secs(15)).await;
    assert!(
        killed_at.elapsed() >= Duration::from_millis(1500),
        "delivered again only after the run timeout"
    );
    let done = wait_for_state(
        &mut client,
        &task.id,
        TaskState::Succeeded,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(done.attempts, 2);

    // 5 s of work under a 2 s run timeout: kept alive, never redelivered.
    let gauge = Gauge::default();
    let _slow = stack.worker(&server, "jobs", 4, gauge.handler(Duration::from_secs(5)));
    drop(_healthy);
    let long = client
        .schedule(NewTask::new("jobs").payload("long"))
        .await
        .expect("book");
    let done = wait_for_state(
        &mut client,
        &long.id,
        TaskState::Succeeded,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(done.attempts, 1, "not redelivered while it ran");
    assert_eq!(gauge.peak.load(Ordering::SeqCst), 1);
}

/// Raising a queue's concurrency reaches running workers without a restart.
async fn settings_changes_reach_running_workers(backend: Backend) {
    let stack = Stack::start(backend).await;
    let server = stack.server().await;
    let mut client = client(&server).await;
    client
        .create_queue("resize", QueueChange::new().max_concurrency(1))
        .await
        .expect("create");
    let gauge = Gauge::default();
    let _workers: Vec<_> = (0..2)
        .map(|_| {
            stack.worker(
                &server,
                "resize",
                4,
                gauge.handler(Duration::from_millis(700)),
            )
        })
        .collect();
    book_now(&mut client, "resize", 4).await;
    gauge.wait_done(4, Duration::from_secs(20)).await;
    assert_eq!(gauge.peak.load(Ordering::SeqCst), 1, "one at a time");

    let queue = client
        .update_queue("resize", QueueChange::new().max_concurrency(4))
        .await
        .expect("update");
    assert_eq!(queue.max_concurrency, 4);
    assert_eq!(queue.max_attempts, 3, "unnamed settings stay");
    book_now(&mut client, "resize", 8).await;
    gauge.wait_done(12, Duration::from_secs(20)).await;
    assert_eq!(
        gauge.peak.load(Ordering::SeqCst),
        4,
        "four at a time after the change"
    );
}

/// A queue comes to exist on first use, with the defaults; tasks booked
/// without their own attempts take the queue's, as it is when they are booked.
async fn queues_are_created_on_first_use(backend: Backend) {
    let stack = Stack::start(backend).await;
    let server = stack.server().await;
    let mut client = client(&server).await;
    let first = client
        .schedule(NewTask::new("fresh").delay(Duration::from_secs(3600)))
        .await
        .expect("book");
    assert_eq!(first.max_attempts, 3);
    let queues = client.list_queues().await.expect("list");
    let fresh = queues
        .iter()
        .find(|q| q.name == "fresh")
        .expect("created on first use");
    assert_eq!(fresh.max_concurrency, 0);
    assert_eq!(fresh.run_timeout, Duration::from_secs(30));
    assert!(!fresh.paused);

    client
        .update_queue(
            "fresh",
            QueueChange::new()
                .max_attempts(7)
                .expire_after(Some(Duration::from_secs(60))),
        )
        .await
        .expect("update");
    // The booking path reads the settings again within a few seconds.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let second = client
        .schedule(NewTask::new("fresh").delay(Duration::from_secs(3600)))
        .await
        .expect("book");
    assert_eq!(second.max_attempts, 7);
    assert_eq!(
        second.expire_at,
        Some(second.due_at + chrono::Duration::seconds(60))
    );
    let own = client
        .schedule(
            NewTask::new("fresh")
                .delay(Duration::from_secs(3600))
                .max_attempts(2),
        )
        .await
        .expect("book");
    assert_eq!(own.max_attempts, 2, "a task's own attempts win");
    let (_, stats) = client.get_queue("fresh").await.expect("get");
    assert_eq!(stats.scheduled, 3);
}

/// Bad queue requests name the field and store nothing.
async fn bad_queue_requests_are_rejected(backend: Backend) {
    let stack = Stack::start(backend).await;
    let server = stack.server().await;
    let mut client = client(&server).await;
    let err = client
        .create_queue("a.b", QueueChange::new())
        .await
        .expect_err("bad name");
    assert_eq!(
        (err.code, err.field.as_deref()),
        (tonic::Code::InvalidArgument, Some("name"))
    );
    let err = client
        .create_queue("q", QueueChange::new().max_attempts(0))
        .await
        .expect_err("bad attempts");
    assert_eq!(err.field.as_deref(), Some("settings.retry.max_attempts"));
    let err = client
        .create_queue(
            "q",
            QueueChange::new().backoff(Duration::from_secs(5), Duration::from_secs(1), 2.0, 0.1),
        )
        .await
        .expect_err("max below initial");
    assert_eq!(err.field.as_deref(), Some("settings.retry.max_backoff"));
    let err = client
        .create_queue(
            "q",
            QueueChange::new().run_timeout(Duration::from_millis(10)),
        )
        .await
        .expect_err("short run timeout");
    assert_eq!(err.field.as_deref(), Some("settings.run_timeout"));
    assert!(
        client.list_queues().await.expect("list").is_empty(),
        "nothing stored"
    );

    client
        .create_queue("q", QueueChange::new())
        .await
        .expect("create");
    let err = client
        .create_queue("q", QueueChange::new())
        .await
        .expect_err("twice");
    assert_eq!(err.code, tonic::Code::AlreadyExists);
    let err = client
        .update_queue("nope", QueueChange::new().max_concurrency(1))
        .await
        .expect_err("unknown");
    assert_eq!(err.code, tonic::Code::NotFound);
    let err = client
        .update_queue("q", QueueChange::new())
        .await
        .expect_err("empty mask");
    assert_eq!(err.field.as_deref(), Some("update_mask"));
    let request = kairos_client::pb_types::UpdateQueueRequest {
        name: "q".into(),
        settings: None,
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["max_concurrency".into()],
        }),
    };
    let status = kairos_client::pb_types::queue_service_client::QueueServiceClient::connect(
        server.url.clone(),
    )
    .await
    .expect("connect")
    .update_queue(request)
    .await
    .expect_err("named but unset");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("settings.max_concurrency"));
    let err = client.pause_queue("nope").await.expect_err("unknown");
    assert_eq!(err.code, tonic::Code::NotFound);
    let (queue, _) = client.get_queue("q").await.expect("get");
    assert_eq!(queue.max_concurrency, 0, "failed updates changed nothing");
}

/// Poison: a payload the handler cannot decode is DEAD at once, a handler
/// that panics is DEAD after its attempts, a message that is not a task at
/// all is reported DEAD; the worker keeps serving the queue throughout, the
/// dead keep every attempt's error, and RetryTask runs them again.
async fn dead_tasks_keep_their_errors_and_can_run_again(backend: Backend) {
    let stack = Stack::start(backend).await;
    let server = stack.server().await;
    let mut client = client(&server).await;
    client
        .create_queue(
            "poison",
            QueueChange::new().max_attempts(3).backoff(
                Duration::from_millis(100),
                Duration::from_millis(500),
                2.0,
                0.0,
            ),
        )
        .await
        .expect("queue");
    let handler = handler_fn(|task| async move {
        match task.payload().as_ref() {
            b"panic" if task.attempt() <= 3 => panic!("handler bug on attempt {}", task.attempt()),
            b"panic" | b"ok" => Ok(()),
            _ => task.json::<serde_json::Value>().map(|_| ()),
        }
    });
    let _worker = stack.worker(&server, "poison", 4, handler);
    let book = |payload: &'static str| NewTask::new("poison").payload(payload);
    let panicker = client.schedule(book("panic")).await.expect("book");
    let garbled = client.schedule(book("{not json")).await.expect("book");
    let fine = client.schedule(book("ok")).await.expect("book");

    let wait = Duration::from_secs(30);
    let dead = wait_for_state(&mut client, &panicker.id, TaskState::Dead, wait).await;
    assert_eq!(dead.attempts, 3, "retried, then dead");
    let dead_json = wait_for_state(&mut client, &garbled.id, TaskState::Dead, wait).await;
    assert_eq!(
        dead_json.attempts, 1,
        "an undecodable payload is not retried"
    );
    wait_for_state(&mut client, &fine.id, TaskState::Succeeded, wait).await;
    let later = client.schedule(book("ok")).await.expect("book");
    wait_for_state(&mut client, &later.id, TaskState::Succeeded, wait).await;

    let (_, attempts) = client.get_task(&panicker.id).await.expect("get");
    assert_eq!(attempts.len(), 3);
    assert!(
        attempts
            .iter()
            .all(|a| a.error.as_deref() == Some("handler panicked"))
    );
    let listed = client
        .list_tasks(Some("poison"), Some(TaskState::Dead), 10, None)
        .await
        .expect("list dead");
    let ids: Vec<&str> = listed.tasks.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&panicker.id.as_str()) && ids.contains(&garbled.id.as_str()));

    // Run the panicking one again: its attempts continue at 4, which succeeds.
    let retried = client.retry_task(&panicker.id).await.expect("retry");
    assert_eq!(retried.state, TaskState::Dispatched);
    let done = wait_for_state(&mut client, &panicker.id, TaskState::Succeeded, wait).await;
    assert_eq!(done.attempts, 4);
    let (_, attempts) = client.get_task(&panicker.id).await.expect("get");
    let outcomes: Vec<(u32, &str)> = attempts.iter().map(|a| (a.attempt, a.outcome)).collect();
    assert_eq!(
        outcomes,
        [
            (1, "failed"),
            (2, "failed"),
            (3, "terminal"),
            (4, "succeeded")
        ]
    );
    let err = client.retry_task(&fine.id).await.expect_err("not dead");
    assert_eq!(err.code, tonic::Code::FailedPrecondition);

    // A queue's dead tasks by error text: the JSON one runs (and dies) again.
    let json_error = dead_json.last_error.clone().expect("an error");
    assert!(json_error.contains("line 1"), "{json_error}");
    let (again, skipped) = client
        .retry_dead("poison", Some("line 1"), 10)
        .await
        .expect("retry dead");
    assert!(skipped.is_empty(), "{skipped:?}");
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].id, garbled.id);
    let redead = wait_for_state(&mut client, &garbled.id, TaskState::Dead, wait).await;
    assert_eq!(redead.attempts, 2);

    // A message on the queue that is not a task envelope at all.
    let victim = client
        .schedule(NewTask::new("poison").delay(Duration::from_secs(3600)))
        .await
        .expect("book");
    let width = 600_000;
    let bucket = victim.due_at.timestamp_millis().div_euclid(width) * width;
    let nats = async_nats::connect(stack.nats.url()).await.expect("nats");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(kairos_proto::wire::TASK_ID_HEADER, victim.id.as_str());
    headers.insert(
        kairos_proto::wire::BUCKET_HEADER,
        bucket.to_string().as_str(),
    );
    async_nats::jetstream::new(nats)
        .publish_with_headers(
            kairos_proto::wire::ready_subject("poison"),
            headers,
            bytes::Bytes::from_static(b"\xff\xff not protobuf"),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
    let poisoned = wait_for_state(&mut client, &victim.id, TaskState::Dead, wait).await;
    assert!(
        poisoned
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("undecodable task message")),
        "{poisoned:?}"
    );
    let last = client.schedule(book("ok")).await.expect("book");
    wait_for_state(&mut client, &last.id, TaskState::Succeeded, wait).await;
}

/// A task's own backoff wins over its queue's: 200 ms, not the queue's 5 s.
async fn a_task_s_own_backoff_overrides_the_queue_s(backend: Backend) {
    let stack = Stack::start(backend).await;
    let server = stack.server().await;
    let mut client = client(&server).await;
    client
        .create_queue(
            "patient",
            QueueChange::new().backoff(Duration::from_secs(5), Duration::from_secs(60), 2.0, 0.0),
        )
        .await
        .expect("queue");
    let (starts, handler) = failing_twice("not yet");
    let _worker = stack.worker(&server, "patient", 2, handler);
    let err = client
        .schedule(NewTask::new("patient").backoff(
            Duration::from_millis(200),
            Duration::from_secs(1),
            2.0,
            3.0,
        ))
        .await
        .expect_err("bad jitter");
    assert_eq!(err.field.as_deref(), Some("backoff.jitter"));
    let task = client
        .schedule(NewTask::new("patient").max_attempts(3).backoff(
            Duration::from_millis(200),
            Duration::from_secs(1),
            2.0,
            0.0,
        ))
        .await
        .expect("book");
    wait_for_state(
        &mut client,
        &task.id,
        TaskState::Succeeded,
        Duration::from_secs(15),
    )
    .await;
    let starts = starts.lock().expect("starts").clone();
    assert_eq!(starts.len(), 3);
    let gaps = [starts[1] - starts[0], starts[2] - starts[1]];
    assert!(gaps[0] >= Duration::from_millis(190), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(390), "{gaps:?}");
    assert!(
        gaps.iter().all(|g| *g < Duration::from_secs(3)),
        "the queue's 5 s did not apply: {gaps:?}"
    );
}

backend_tests!(
    global_concurrency_holds_across_workers,
    rate_limit_spreads_starts_and_drops_none,
    pause_holds_due_tasks_and_resume_releases_them_in_order,
    retries_follow_the_queue_backoff,
    run_timeout_redelivers_only_what_a_dead_worker_held,
    settings_changes_reach_running_workers,
    queues_are_created_on_first_use,
    bad_queue_requests_are_rejected,
    dead_tasks_keep_their_errors_and_can_run_again,
    a_task_s_own_backoff_overrides_the_queue_s,
);

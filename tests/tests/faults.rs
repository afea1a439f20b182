//! Replicas, crashes and backend outages: nothing acknowledged is lost and
//! nothing runs twice.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt as _;
use kairos_client::{NewTask, QueueChange, TaskState};
use kairos_server::bus::BatchPublish;
use kairos_server::domain::bucket_of;
use kairos_tests::stack::{client, wait_all_succeeded, wait_for_state};
use kairos_tests::{Backend, NatsServer, RunLog, ServerHandle, Stack, WorkerHandle, backend_tests};
use kairos_worker::{HandlerError, handler_fn};

async fn book(
    client: &mut kairos_client::Client,
    queue: &str,
    n: usize,
    due_in_ms: i64,
) -> Vec<String> {
    let due = Utc::now() + chrono::Duration::milliseconds(due_in_ms);
    let mut ids = Vec::with_capacity(n);
    let mut left = n;
    while left > 0 {
        let chunk = left.min(1000);
        let batch = (0..chunk).map(|_| NewTask::new(queue).at(due)).collect();
        for result in client.schedule_batch(batch).await.expect("batch") {
            ids.push(result.expect("stored").id);
        }
        left -= chunk;
    }
    ids
}

/// Books one task due now on "default", retrying for up to 30 s while a
/// restarted NATS comes back.
async fn schedule_once_nats_is_back(client: &mut kairos_client::Client) -> kairos_client::Task {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match client.schedule(NewTask::new("default")).await {
            Ok(task) => return task,
            Err(err) if err.is_retryable() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(err) => panic!("scheduling after the restart failed: {err}"),
        }
    }
}

/// Books one more task once a restarted NATS is back, adds its id to
/// `ids` and waits up to `within` for it to succeed; returns how long that
/// took from its booking.
async fn one_more_succeeds_within(
    client: &mut kairos_client::Client,
    ids: &mut Vec<String>,
    within: Duration,
) -> Duration {
    let later = schedule_once_nats_is_back(client).await;
    let booked = tokio::time::Instant::now();
    ids.push(later.id.clone());
    wait_for_state(client, &later.id, TaskState::Succeeded, within).await;
    booked.elapsed()
}

fn assert_each_ran_once(log: &RunLog, ids: &[String]) {
    let counts = log.counts();
    for id in ids {
        assert_eq!(counts.get(id).copied().unwrap_or(0), 1, "task {id} runs");
    }
    assert_eq!(log.len(), ids.len(), "no run beyond the booked tasks");
}

/// A replica is killed while it holds tasks in its timer; another replica
/// takes its buckets over and releases each task exactly once.
async fn killed_replica_tasks_move_to_another(backend: Backend) {
    let stack = Stack::start(backend).await;
    let mut first = stack.server().await;
    let mut client_a = client(&first).await;
    let ids = book(&mut client_a, "default", 500, 4000).await;
    stack.wait_held(500).await;

    let second = stack.server().await;
    let log = RunLog::default();
    let _worker = stack.worker(&second, "default", 16, log.handler());
    first.kill().await;

    log.wait_for(500, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_each_ran_once(&log, &ids);
    let mut client_b = client(&second).await;
    wait_for_state(
        &mut client_b,
        &ids[0],
        TaskState::Succeeded,
        Duration::from_secs(10),
    )
    .await;
}

/// The only replica is killed while holding tasks; once it is restarted it
/// releases each of them exactly once.
async fn restarted_replica_releases_its_tasks(backend: Backend) {
    let stack = Stack::start(backend).await;
    let mut first = stack.server().await;
    let mut client_a = client(&first).await;
    let ids = book(&mut client_a, "default", 300, 2000).await;
    stack.wait_held(300).await;
    first.kill().await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let again = stack.server().await;
    let log = RunLog::default();
    let _worker = stack.worker(&again, "default", 16, log.handler());
    log.wait_for(300, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_each_ran_once(&log, &ids);
}

/// A replica restarted after the first tasks of a bucket ran (so the bucket's
/// stream no longer starts at its first message) pulls the bucket again and
/// releases the rest once each.
async fn restarted_replica_pulls_a_bucket_whose_first_tasks_ran(backend: Backend) {
    let stack = Stack::start(backend).await;
    let width_ms = stack.config().bucket_width.as_millis() as i64;
    let bucket_in = |ms: i64| bucket_of(Utc::now().timestamp_millis() + ms, width_ms);
    if bucket_in(1000) != bucket_in(10_000) {
        // Both rounds in one bucket: wait for the next one.
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    let mut first = stack.server().await;
    let mut client_a = client(&first).await;
    let log = RunLog::default();
    let mut worker = stack.worker(&first, "default", 16, log.handler());
    let early = book(&mut client_a, "default", 50, 1000).await;
    log.wait_for(50, Duration::from_secs(20)).await;
    let later = book(&mut client_a, "default", 50, 6000).await;
    stack.wait_held(50).await;
    worker.stop().await;
    first.kill().await;

    let again = stack.server().await;
    let _worker = stack.worker(&again, "default", 16, log.handler());
    log.wait_for(100, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_each_ran_once(&log, &[early, later].concat());
}

/// Two replicas and three workers on one queue: 5,000 tasks, each run exactly once.
async fn two_replicas_three_workers_run_each_task_once(backend: Backend) {
    let stack = Stack::start(backend).await;
    let r1 = stack.server().await;
    let r2 = stack.server().await;
    let log = RunLog::default();
    let _w1 = stack.worker(&r1, "fanout", 16, log.handler());
    let _w2 = stack.worker(&r2, "fanout", 16, log.handler());
    let _w3 = stack.worker(&r1, "fanout", 16, log.handler());
    let (mut c1, mut c2) = (client(&r1).await, client(&r2).await);
    let mut ids = Vec::new();
    for round in 0..5 {
        let client = if round % 2 == 0 { &mut c1 } else { &mut c2 };
        ids.extend(book(client, "fanout", 1000, 2000 + round * 500).await);
    }
    log.wait_for(5000, Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_each_ran_once(&log, &ids);
    let workers: std::collections::HashSet<_> =
        log.runs().into_iter().map(|r| r.worker_id).collect();
    assert_eq!(workers.len(), 3, "all three workers took tasks");
}

/// Redis down: Schedule and Cancel answer UNAVAILABLE and store nothing, not
/// even an event a subscriber sees; once Redis is back, everything scheduled
/// before fires.
async fn redis_outage_is_unavailable_then_everything_fires(backend: Backend) {
    let mut stack = Stack::start(backend).await;
    let server = stack.server().await;
    let log = RunLog::default();
    let _worker = stack.worker(&server, "default", 4, log.handler());
    let mut client = client(&server).await;
    let before = book(&mut client, "default", 20, 2500).await;
    let mut refused_queue = client
        .subscribe(
            kairos_client::Subscribe::all().queue("refused"),
            Duration::from_secs(5),
        )
        .await
        .expect("subscribe");

    stack.redis.stop();
    let err = client
        .schedule(NewTask::new("default").delay(Duration::from_secs(1)))
        .await
        .expect_err("redis is down");
    assert_eq!(err.code, tonic::Code::Unavailable, "{err}");
    let err = client.cancel(&before[0]).await.expect_err("redis is down");
    assert_eq!(err.code, tonic::Code::Unavailable, "{err}");
    let err = client
        .schedule_batch(vec![NewTask::new("default"); 3])
        .await
        .expect_err("redis is down");
    assert_eq!(err.code, tonic::Code::Unavailable, "{err}");
    let err = client
        .schedule_batch(vec![NewTask::new("refused"); 3])
        .await
        .expect_err("redis is down");
    assert_eq!(err.code, tonic::Code::Unavailable, "{err}");

    // The tasks fall due during the outage; late beats wrong, so they wait.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(log.is_empty(), "nothing runs without its claim");
    stack.redis.restart();

    log.wait_for(20, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_each_ran_once(&log, &before);
    let page = client
        .list_tasks(None, None, 100, None)
        .await
        .expect("list");
    assert_eq!(page.tasks.len(), 20, "the refused requests stored nothing");
    let booked = client
        .schedule(NewTask::new("refused").delay(Duration::from_secs(60)))
        .await
        .expect("schedule works again");
    let first = tokio::time::timeout(Duration::from_secs(10), refused_queue.next())
        .await
        .expect("an event")
        .expect("stream open")
        .expect("event");
    assert_eq!(
        (first.task_id.as_str(), first.state),
        (booked.id.as_str(), TaskState::Scheduled),
        "the refused batch left no event behind"
    );
    let after = client
        .schedule(NewTask::new("default"))
        .await
        .expect("schedule works again");
    wait_for_state(
        &mut client,
        &after.id,
        TaskState::Succeeded,
        Duration::from_secs(10),
    )
    .await;
}

/// NATS killed and restarted: the server and workers reconnect and no
/// acknowledged task is lost or run twice.
async fn nats_restart_loses_no_acknowledged_task(backend: Backend) {
    let mut stack = Stack::start(backend).await;
    let server = stack.server().await;
    let log = RunLog::default();
    let _worker = stack.worker(&server, "default", 8, log.handler());
    let mut client = client(&server).await;
    let mut ids = book(&mut client, "default", 200, 4000).await;
    stack.wait_held(200).await;

    stack.nats.restart();

    log.wait_for(200, Duration::from_secs(60)).await;
    one_more_succeeds_within(&mut client, &mut ids, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_each_ran_once(&log, &ids);
}

/// The server a worker reports to restarts while the worker runs tasks: the
/// worker reconnects, sends what was not answered, and no result is lost.
async fn worker_reconnects_after_server_restart_without_losing_results(backend: Backend) {
    let stack = Stack::start(backend).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut server = stack.server_on(stack.config(), listener).await;
    let log = RunLog::default();
    let handler = log.slow_handler(Duration::from_millis(1500));
    let _worker = stack.worker(&server, "slow", 8, handler);
    let mut client = client(&server).await;
    let ids = book(&mut client, "slow", 16, 0).await;

    log.wait_for(1, Duration::from_secs(10)).await;
    server.stop().await.expect("graceful stop");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .expect("same port again");
    let server = stack.server_on(stack.config(), listener).await;

    let mut client = kairos_tests::stack::client(&server).await;
    wait_all_succeeded(&mut client, &ids, Duration::from_secs(60)).await;
    assert_each_ran_once(&log, &ids);
}

/// Task messages the bucket's consumer delivered but the dispatcher never
/// got (as if lost between nats-server and the puller) are not left to the
/// consumer's ack_wait of most of an hour: the bucket audit sees that the
/// consumer counts more than the dispatcher holds and reloads the bucket.
async fn bucket_messages_lost_on_the_way_come_back(backend: Backend) {
    let stack = Stack::start(backend).await;
    let mut config = stack.config();
    config.bucket_audit_interval = Duration::from_millis(500);
    let width_ms = config.bucket_width.as_millis() as i64;
    let server = stack.server_with(config).await;
    let mut client = client(&server).await;
    let due_in_ms = 6000;
    let due_ms = Utc::now().timestamp_millis() + due_in_ms;
    // Far enough from the bucket's end that the tasks fall in it.
    let bucket_ms = bucket_of(due_ms + 500, width_ms);
    let mut lost = stack.pull_behind_dispatcher(bucket_ms, 4).await;
    let ids = book(&mut client, "default", 12, due_in_ms).await;
    let mut taken = 0;
    while taken < 4 {
        match tokio::time::timeout(Duration::from_secs(3), lost.next()).await {
            Ok(Some(_)) => taken += 1,
            _ => break,
        }
    }
    assert!(taken > 0, "no message went past the dispatcher");

    let log = RunLog::default();
    let _worker = stack.worker(&server, "default", 16, log.handler());
    log.wait_for(ids.len(), Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_each_ran_once(&log, &ids);
    let early: Vec<_> = log
        .runs()
        .into_iter()
        .filter(|run| run.at < run.due_at)
        .collect();
    assert!(
        early.is_empty(),
        "tasks ran before their due time: {early:?}"
    );
}

/// JetStream stores only part of a batch (the tasks stream is full): every
/// task of it is refused, nothing of it is kept, and none of the tasks that
/// did reach the stream runs. For both ways of publishing a batch.
async fn a_batch_stored_in_part_is_refused_whole_and_none_of_it_runs(backend: Backend) {
    for mode in [BatchPublish::Fast, BatchPublish::Atomic] {
        let stack = Stack::start(backend).await;
        let mut config = stack.config();
        config.batch_publish = mode;
        let server = stack.server_with(config).await;
        let log = RunLog::default();
        let _worker = stack.worker(&server, "default", 8, log.handler());
        let mut client = client(&server).await;
        // Due after the batch's fate is read: until its release the stream
        // holds each of them.
        let kept = book(&mut client, "default", 100, 4000).await;
        stack.set_tasks_max_messages(400).await;

        let due = Utc::now() + chrono::Duration::milliseconds(4000);
        let batch = (0..1000).map(|_| NewTask::new("default").at(due)).collect();
        let results = client.schedule_batch(batch).await.expect("batch answered");
        assert_eq!(results.len(), 1000);
        for result in results {
            let err = result.expect_err("the stream refused part of the batch");
            assert_eq!(err.code, tonic::Code::Unavailable, "{mode:?}: {err}");
        }
        let (in_stream, _) = stack.stream_state("KAIROS_TASKS").await;
        let stored = if mode == BatchPublish::Fast { 300 } else { 0 };
        assert_eq!(in_stream, 100 + stored, "{mode:?}: what reached the stream");
        let page = client
            .list_tasks(None, None, 1000, None)
            .await
            .expect("list");
        assert_eq!(
            page.tasks.len(),
            100,
            "{mode:?}: nothing of the batch is kept"
        );

        log.wait_for(100, Duration::from_secs(15)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_each_ran_once(&log, &kept);

        stack.set_tasks_max_messages(-1).await;
        let after = book(&mut client, "default", 20, 0).await;
        wait_all_succeeded(&mut client, &after, Duration::from_secs(15)).await;
    }
}

/// With the default `KAIROS_BATCH_PUBLISH=auto`, a replica publishes atomic
/// batches to NATS that syncs every message and fast ones to NATS with its
/// default sync: capped, the tasks stream keeps nothing of a refused atomic
/// batch and the first part of a fast one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_batches_follow_how_nats_syncs() {
    for syncs_always in [true, false] {
        let mut stack = Stack::start(Backend::Sqlite).await;
        if !syncs_always {
            stack.nats = NatsServer::start_default_sync();
        }
        let mut config = stack.config();
        config.batch_publish = BatchPublish::Auto;
        let server = stack.server_with(config).await;
        let mut client = client(&server).await;
        stack.set_tasks_max_messages(300).await;
        let due = Utc::now() + chrono::Duration::hours(1);
        let batch = (0..1000).map(|_| NewTask::new("default").at(due)).collect();
        let results = client.schedule_batch(batch).await.expect("batch answered");
        assert!(results.iter().all(Result::is_err), "the batch is refused");
        let (in_stream, _) = stack.stream_state("KAIROS_TASKS").await;
        let expected = if syncs_always { 0 } else { 300 };
        assert_eq!(in_stream, expected, "NATS syncs always: {syncs_always}");
    }
}

/// A client gives up on a ScheduleBatch while the server is still booking
/// it (held up by the database here): the booking still runs to its end, so
/// each task it wrote runs once, none is left SCHEDULED without its message.
async fn a_batch_the_client_gives_up_on_is_booked_whole(backend: Backend) {
    let stack = Stack::start(backend).await;
    let server = stack.server().await;
    let log = RunLog::default();
    let _worker = stack.worker(&server, "default", 8, log.handler());
    let mut client = client(&server).await;
    let lock = stack.hold_sql_writes().await;
    let due = Utc::now() + chrono::Duration::milliseconds(3000);
    let batch = (0..200).map(|_| NewTask::new("default").at(due)).collect();
    let call = client.schedule_batch(batch);
    let gave_up = tokio::time::timeout(Duration::from_millis(500), call).await;
    assert!(gave_up.is_err(), "the batch waits for the database");
    lock.release().await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let ids = loop {
        let page = client
            .list_tasks(None, None, 1000, None)
            .await
            .expect("list");
        if page.tasks.len() == 200 || tokio::time::Instant::now() > deadline {
            break page.tasks.into_iter().map(|t| t.id).collect::<Vec<_>>();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(ids.len(), 200, "the booking went on without the client");
    log.wait_for(200, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_each_ran_once(&log, &ids);
}

backend_tests!(
    a_batch_the_client_gives_up_on_is_booked_whole,
    a_batch_stored_in_part_is_refused_whole_and_none_of_it_runs,
    bucket_messages_lost_on_the_way_come_back,
    killed_replica_tasks_move_to_another,
    restarted_replica_releases_its_tasks,
    restarted_replica_pulls_a_bucket_whose_first_tasks_ran,
    two_replicas_three_workers_run_each_task_once,
    redis_outage_is_unavailable_then_everything_fires,
    nats_restart_loses_no_acknowledged_task,
    worker_reconnects_after_server_restart_without_losing_results,
);

/// NATS restarts and loses the dispatcher's bucket consumers (they live in
/// memory); the dispatcher sees it only when their heartbeats stop, about
/// 10 s later, by which time a narrow bucket is past. A task booked into it
/// just after the restart must not wait for the next scan of the stream
/// (every 30 s) to be found: the bucket is reopened at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_gone_past_while_nats_restarted_is_reopened_at_once() {
    let mut stack = Stack::start(Backend::Sqlite).await;
    let mut config = stack.config();
    config.bucket_width = Duration::from_secs(2);
    let server = stack.server_with(config).await;
    let log = RunLog::default();
    let _worker = stack.worker(&server, "default", 8, log.handler());
    let mut client = client(&server).await;
    let mut ids = book(&mut client, "default", 20, 1500).await;
    stack.nats.restart();
    // Left to the next scan, it would come 30 s after the server started.
    one_more_succeeds_within(&mut client, &mut ids, Duration::from_secs(20)).await;
    wait_all_succeeded(&mut client, &ids, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_each_ran_once(&log, &ids);
}

/// A SQLite stack with one worker on "default" that has run a first task,
/// which proves the worker pulls and the current bucket is open before NATS
/// restarts.
struct Warm {
    stack: Stack,
    _server: ServerHandle,
    _worker: WorkerHandle,
    log: RunLog,
    client: kairos_client::Client,
    /// The first task's id.
    ids: Vec<String>,
}

impl Warm {
    async fn start() -> Self {
        let stack = Stack::start(Backend::Sqlite).await;
        let server = stack.server().await;
        let log = RunLog::default();
        let worker = stack.worker(&server, "default", 8, log.handler());
        let mut client = client(&server).await;
        let ids = book(&mut client, "default", 1, 0).await;
        wait_all_succeeded(&mut client, &ids, Duration::from_secs(10)).await;
        Self {
            stack,
            _server: server,
            _worker: worker,
            log,
            client,
            ids,
        }
    }
}

/// NATS restarts and loses the dispatcher's bucket consumers. The dispatcher
/// finds that out when its client reconnects, not when the consumers'
/// heartbeats stop (5 to 10 s after the outage began), so a task booked into
/// an open bucket just after the restart runs at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_consumer_lost_to_a_nats_restart_is_replaced_on_reconnect() {
    let mut warm = Warm::start().await;

    warm.stack.nats.restart();
    // Left to the heartbeats, it would wait at least 4 s more.
    let took =
        one_more_succeeds_within(&mut warm.client, &mut warm.ids, Duration::from_secs(4)).await;
    eprintln!("ran {took:?} after booking");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_each_ran_once(&warm.log, &warm.ids);
}

/// NATS restarts while a worker waits on a pull, which the restarted server
/// no longer knows. The worker pulls again as soon as its client reconnects
/// instead of waiting for the lost pull to time out (up to 7 s), so a task
/// released just after the restart runs on time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_pulls_again_as_soon_as_a_restarted_nats_is_back() {
    let mut warm = Warm::start().await;
    // Due inside the release lead: it goes to the worker only when due,
    // from the dispatcher's timer, after the restart.
    let due_in = Duration::from_millis(1500);
    let booked = tokio::time::Instant::now();
    let soon = book(&mut warm.client, "default", 1, due_in.as_millis() as i64).await;
    warm.stack.wait_held(1).await;

    warm.stack.nats.restart();
    warm.ids.extend(soon.iter().cloned());
    // Left to the lost pull's timeout, it would run 3.5 s late or more.
    let left = (due_in + Duration::from_secs(2)).saturating_sub(booked.elapsed());
    wait_for_state(&mut warm.client, &soon[0], TaskState::Succeeded, left).await;
    eprintln!("ran {:?} after booking", booked.elapsed());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_each_ran_once(&warm.log, &warm.ids);
}

/// NATS restarts while a worker runs a task, and then that worker dies: the
/// task is not left RUNNING. The queue consumer keeps its record of the
/// delivery across the restart (its state is on disk), so the task comes
/// again once the run timeout passes, as attempt 2, and another worker
/// completes it. A queue consumer kept in nats-server's memory would come
/// back empty and hand the task out anew as attempt 1, whose start claim the
/// running attempt 1 skips, and nothing would deliver it again (BENCHMARKS
/// item 49).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_running_across_a_nats_restart_runs_again_when_its_worker_dies() {
    let mut stack = Stack::start(Backend::Sqlite).await;
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
    let mut doomed = stack.worker(&server, "jobs", 1, hung.hanging_handler(Arc::default()));
    let task = client
        .schedule(NewTask::new("jobs").payload("long"))
        .await
        .expect("book");
    hung.wait_for(1, Duration::from_secs(10)).await;
    // nats-server writes a consumer's state at most every 100 ms.
    tokio::time::sleep(Duration::from_millis(500)).await;

    stack.nats.restart();
    // The worker reconnects and keeps its delivery alive, then dies.
    tokio::time::sleep(Duration::from_secs(3)).await;
    doomed.kill().await;

    let log = RunLog::default();
    let _healthy = stack.worker(&server, "jobs", 1, log.handler());
    let done = wait_for_state(
        &mut client,
        &task.id,
        TaskState::Succeeded,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(done.attempts, 2, "run again as the next attempt");
    assert_eq!(log.counts().get(&task.id).copied(), Some(1));
}

/// NATS restarts while a failed task waits out its backoff: the retry still
/// comes, as attempt 2. The attempt number is JetStream's delivery count,
/// and the queue consumer keeps it, with the delayed redelivery, across the
/// restart (its state is on disk). A consumer kept in nats-server's memory
/// would hand the task out anew as attempt 1, whose start claim the ended
/// attempt 1 skips (BENCHMARKS item 49).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_waiting_across_a_nats_restart_still_comes() {
    let mut stack = Stack::start(Backend::Sqlite).await;
    let server = stack.server().await;
    let mut client = client(&server).await;
    let log = RunLog::default();
    let flaky = {
        let log = log.clone();
        handler_fn(move |task| {
            let log = log.clone();
            async move {
                log.record(&task);
                if task.attempt() == 1 {
                    return Err(HandlerError::retry_after(
                        "first attempt fails",
                        Duration::from_secs(3),
                    ));
                }
                Ok(())
            }
        })
    };
    let _worker = stack.worker(&server, "default", 4, flaky);
    let task = client
        .schedule(NewTask::new("default").max_attempts(3))
        .await
        .expect("book");
    wait_for_state(
        &mut client,
        &task.id,
        TaskState::Retrying,
        Duration::from_secs(10),
    )
    .await;
    // nats-server writes a consumer's state at most every 100 ms.
    tokio::time::sleep(Duration::from_millis(500)).await;

    stack.nats.restart();
    let done = wait_for_state(
        &mut client,
        &task.id,
        TaskState::Succeeded,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(done.attempts, 2, "the retry is attempt 2");
    assert_eq!(log.counts().get(&task.id).copied(), Some(2));
}

//! Subscribe: live and resumable task event streams, across replicas, with
//! bounded buffers per subscriber.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt as _;
use kairos_client::pb_types as pb;
use kairos_client::{Client, ClientError, EventStream, NewTask, Subscribe, TaskEvent, TaskState};
use kairos_tests::stack::client;
use kairos_tests::{Backend, RunLog, Stack, backend_tests};
use kairos_worker::{HandlerError, handler_fn};

use TaskState::{Cancelled, Dispatched, Retrying, Running, Scheduled, Succeeded};

/// How long a resuming client keeps trying.
const PATIENCE: Duration = Duration::from_secs(30);

/// Reads `events` until `done` holds for what was read, or panics after `timeout`.
async fn read_until(
    events: &mut EventStream,
    timeout: Duration,
    mut done: impl FnMut(&[TaskEvent]) -> bool,
) -> Vec<TaskEvent> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while !done(&seen) {
        let next = tokio::time::timeout_at(deadline, events.next()).await;
        match next {
            Ok(Some(Ok(event))) => seen.push(event),
            Ok(Some(Err(err))) => panic!("stream failed after {} events: {err}", seen.len()),
            Ok(None) => panic!("stream ended after {} events", seen.len()),
            Err(_) => panic!("only {} events after {timeout:?}", seen.len()),
        }
    }
    seen
}

/// Reads exactly `n` events.
async fn read_n(events: &mut EventStream, n: usize, timeout: Duration) -> Vec<TaskEvent> {
    read_until(events, timeout, |seen| seen.len() >= n).await
}

/// Asserts that nothing more arrives for a while.
async fn assert_quiet(events: &mut EventStream, what: &str) {
    if let Ok(Some(extra)) = tokio::time::timeout(Duration::from_millis(500), events.next()).await {
        panic!("{what}: unexpected extra event {extra:?}");
    }
}

/// Returns the states of each task, in the order they arrived.
fn states_by_task(events: &[TaskEvent]) -> HashMap<String, Vec<TaskState>> {
    let mut map: HashMap<String, Vec<TaskState>> = HashMap::new();
    for e in events {
        map.entry(e.task_id.clone()).or_default().push(e.state);
    }
    map
}

fn assert_cursors_increase(events: &[TaskEvent]) {
    for pair in events.windows(2) {
        assert!(
            pair[0].cursor < pair[1].cursor,
            "cursor {} then {}",
            pair[0].cursor,
            pair[1].cursor
        );
    }
}

/// Connects with small HTTP/2 windows, so little sits in flight to a reader
/// that stopped (one connection each: unread data holds the connection window).
async fn small_window_client(url: &str) -> Client {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("url")
        .initial_stream_window_size(64 * 1024)
        .initial_connection_window_size(64 * 1024)
        .connect()
        .await
        .expect("connect");
    Client::from_channel(channel)
}

/// Books `n` tasks on `queue` due after `delay`, in batches.
async fn book(client: &mut Client, queue: &str, n: usize, delay: Duration) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for start in (0..n).step_by(1000) {
        let batch = (start..n.min(start + 1000))
            .map(|i| NewTask::new(queue).payload(format!("{i}")).delay(delay))
            .collect();
        for result in client.schedule_batch(batch).await.expect("batch") {
            ids.push(result.expect("booked").id);
        }
    }
    ids
}

/// Subscribing before scheduling shows each task's life in order: a plain
/// task, one retried once, and one cancelled.
async fn events_follow_each_task_in_order(backend: Backend) {
    let stack = Stack::start(backend).await;
    let server = stack.server().await;
    let mut client = client(&server).await;
    let mut events = client
        .subscribe(Subscribe::all().queue("life"), PATIENCE)
        .await
        .expect("subscribe");

    let handler = handler_fn(|task| async move {
        if task.payload().as_ref() == b"flaky" && task.attempt() == 1 {
            return Err(HandlerError::retry_after(
                "gateway busy",
                Duration::from_millis(300),
            ));
        }
        Ok(())
    });
    let _worker = stack.worker(&server, "life", 4, handler);
    let plain = client
        .schedule(NewTask::new("life").payload("plain"))
        .await
        .expect("plain");
    let flaky = client
        .schedule(NewTask::new("life").payload("flaky").max_attempts(3))
        .await
        .expect("flaky");
    let doomed = client
        .schedule(
            NewTask::new("life")
                .payload("doomed")
                .delay(Duration::from_secs(60)),
        )
        .await
        .expect("doomed");
    client.cancel(&doomed.id).await.expect("cancel");

    let seen = read_until(&mut events, Duration::from_secs(30), |seen| {
        let finals = seen.iter().filter(|e| e.state.is_final()).count();
        finals == 3
    })
    .await;
    assert_quiet(&mut events, "after the three tasks ended").await;
    assert_cursors_increase(&seen);
    let by_task = states_by_task(&seen);
    assert_eq!(
        by_task[&plain.id],
        [Scheduled, Dispatched, Running, Succeeded]
    );
    assert_eq!(
        by_task[&flaky.id],
        [Scheduled, Dispatched, Running, Retrying, Running, Succeeded]
    );
    assert_eq!(by_task[&doomed.id], [Scheduled, Cancelled]);

    let flaky_events: Vec<&TaskEvent> = seen.iter().filter(|e| e.task_id == flaky.id).collect();
    let attempts: Vec<u32> = flaky_events.iter().map(|e| e.attempt).collect();
    assert_eq!(attempts, [0, 0, 1, 1, 2, 2]);
    let retrying = flaky_events[3];
    assert_eq!(retrying.error.as_deref(), Some("gateway busy"));
    assert!(
        retrying.worker_id.is_some(),
        "attempt events name the worker"
    );
    assert!(flaky_events.iter().all(|e| e.queue == "life"));

    // The same history, replayed for one task from the beginning.
    let mut replay = client
        .subscribe(Subscribe::all().task(&flaky.id).from_beginning(), PATIENCE)
        .await
        .expect("replay");
    let replayed = read_n(&mut replay, 6, Duration::from_secs(10)).await;
    let expected: Vec<TaskEvent> = flaky_events.into_iter().cloned().collect();
    assert_eq!(replayed, expected);
    assert_quiet(&mut replay, "replay of one task").await;
}

/// A schedule filter follows the occurrences of one recurring schedule,
/// from the beginning of its history, each event naming the schedule.
async fn schedule_filter_follows_its_occurrences(backend: Backend) {
    let stack = Stack::start(backend).await;
    let server = stack.server().await;
    let mut client = client(&server).await;
    let log = RunLog::default();
    let _worker = stack.worker(&server, "ticks", 4, log.handler());
    // Noise on the same queue that the filter must leave out.
    book(&mut client, "ticks", 5, Duration::from_millis(200)).await;
    let schedule = client
        .create_recurring(kairos_client::NewRecurring::new("ticks", "* * * * * *"))
        .await
        .expect("create");
    log.wait_for(5 + 2, Duration::from_secs(15)).await;

    let mut events = client
        .subscribe(
            Subscribe::all().schedule(&schedule.id).from_beginning(),
            PATIENCE,
        )
        .await
        .expect("subscribe");
    let seen = read_until(&mut events, Duration::from_secs(15), |seen| {
        seen.iter().filter(|e| e.state == Succeeded).count() >= 3
    })
    .await;
    assert!(
        seen.iter()
            .all(|e| e.schedule_id.as_deref() == Some(schedule.id.as_str())),
        "only the schedule's occurrences"
    );
    let by_task = states_by_task(&seen);
    let finished: Vec<&Vec<TaskState>> = by_task
        .values()
        .filter(|states| states.contains(&Succeeded))
        .collect();
    assert!(finished.len() >= 3);
    for states in finished {
        assert_eq!(*states, [Scheduled, Dispatched, Running, Succeeded]);
    }
    client
        .delete_recurring(&schedule.id, true)
        .await
        .expect("delete");
}

/// Three replicas: a task booked through A, dispatched by whichever holds
/// its bucket, reported through C, shows up on streams held on A, B and C
/// alike, in the same order.
async fn events_from_every_replica_reach_every_subscriber(backend: Backend) {
    let stack = Stack::start(backend).await;
    let a = stack.server().await;
    let b = stack.server().await;
    let c = stack.server().await;
    let mut streams = Vec::new();
    for server in [&a, &b, &c] {
        let client = client(server).await;
        streams.push(
            client
                .subscribe(Subscribe::all().queue("spread"), PATIENCE)
                .await
                .expect("subscribe"),
        );
    }
    let log = RunLog::default();
    let _worker = stack.worker(&c, "spread", 8, log.handler());
    let mut producer = client(&a).await;
    let ids = book(&mut producer, "spread", 50, Duration::from_millis(500)).await;

    let mut all = Vec::new();
    for stream in &mut streams {
        let seen = read_n(stream, ids.len() * 4, Duration::from_secs(30)).await;
        assert_quiet(stream, "after every task succeeded").await;
        all.push(seen);
    }
    let by_task = states_by_task(&all[0]);
    assert_eq!(by_task.len(), ids.len());
    for id in &ids {
        assert_eq!(by_task[id], [Scheduled, Dispatched, Running, Succeeded]);
    }
    assert_eq!(all[0], all[1], "replica B saw what A saw");
    assert_eq!(all[0], all[2], "replica C saw what A saw");
}

/// A subscriber drops its stream on replica A while 1,000 tasks run and
/// resumes from its last cursor on replica B: together the two streams hold
/// every event exactly once.
async fn resume_on_another_replica_has_no_gap_and_no_duplicate(backend: Backend) {
    let stack = Stack::start(backend).await;
    let a = stack.server().await;
    let b = stack.server().await;
    let handler = handler_fn(|_task| async move {
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok(())
    });
    let _worker = stack.worker(&a, "resume", 16, handler);
    let mut producer = client(&a).await;

    let (mut first, start) = producer
        .clone()
        .subscribe_once(&Subscribe::all().queue("resume"))
        .await
        .expect("subscribe on A");
    let ids = book(&mut producer, "resume", 1000, Duration::from_secs(1)).await;
    let total = ids.len() * 4;

    // Read part of the stream, past the bookings and into the runs.
    let mut before = Vec::new();
    while before.len() < total * 2 / 5 {
        let message = tokio::time::timeout(Duration::from_secs(30), first.message())
            .await
            .expect("events keep coming")
            .expect("stream healthy")
            .expect("stream open");
        before.push(TaskEvent::from(message.event.expect("event")));
    }
    drop(first);
    let last = before.last().expect("events").cursor;

    let resumed_client = client(&b).await;
    let mut second = resumed_client
        .subscribe(Subscribe::all().queue("resume").after(last), PATIENCE)
        .await
        .expect("resume on B");
    let after = read_n(&mut second, total - before.len(), Duration::from_secs(60)).await;
    assert_quiet(&mut second, "after the last task").await;

    let union: Vec<TaskEvent> = before.iter().chain(&after).cloned().collect();
    assert_cursors_increase(&union);
    let by_task = states_by_task(&union);
    assert_eq!(by_task.len(), ids.len());
    for id in &ids {
        assert_eq!(by_task[id], [Scheduled, Dispatched, Running, Succeeded]);
    }
    // And it is what the log holds: a full replay gives the same events.
    let mut replay = resumed_client
        .subscribe(Subscribe::all().queue("resume").after(start), PATIENCE)
        .await
        .expect("replay");
    let replayed = read_n(&mut replay, total, Duration::from_secs(30)).await;
    assert_eq!(replayed, union);
}

/// A subscriber that stops reading while 50,000 events flow is cut off with
/// a resumable error once its buffer fills; another subscriber keeps up
/// meanwhile, and resuming from the error's cursor misses nothing.
async fn slow_subscriber_is_cut_off_and_can_resume(backend: Backend) {
    const BUFFER: usize = 1000;
    const EVENTS: usize = 50_000;
    let stack = Stack::start(backend).await;
    let mut config = stack.config();
    config.subscribe_buffer = BUFFER;
    let server = stack.server_with(config).await;
    let mut producer = client(&server).await;

    let slow_client = small_window_client(&server.url).await;
    let (mut slow, start) = slow_client
        .clone()
        .subscribe_once(&Subscribe::all().queue("flood"))
        .await
        .expect("slow subscriber");
    let mut auto = small_window_client(&server.url)
        .await
        .subscribe(Subscribe::all().queue("flood"), PATIENCE)
        .await
        .expect("self-resuming slow subscriber");
    let mut fast = producer
        .subscribe(Subscribe::all().queue("flood"), PATIENCE)
        .await
        .expect("fast subscriber");
    let reader = tokio::spawn(async move {
        let seen = read_n(&mut fast, EVENTS, Duration::from_secs(180)).await;
        assert_quiet(&mut fast, "fast subscriber").await;
        seen
    });
    // Tasks an hour ahead: one SCHEDULED event each, nothing runs.
    let ids = book(&mut producer, "flood", EVENTS, Duration::from_secs(3600)).await;
    let fast_seen = reader.await.expect("fast reader");
    // A self-resuming subscriber that did not read meanwhile is cut off too,
    // and reopens after its last event: it still gets all 50,000, once each.
    let auto_seen = read_n(&mut auto, EVENTS, Duration::from_secs(120)).await;
    assert_eq!(auto_seen, fast_seen, "self-resumed after ABORTED");
    assert_eq!(fast_seen.len(), EVENTS);
    assert_cursors_increase(&fast_seen);
    let booked: HashSet<&String> = ids.iter().collect();
    assert!(fast_seen.iter().all(|e| booked.contains(&e.task_id)));

    // Now the slow one reads: what was in flight, then the resumable error.
    let mut slow_seen = Vec::new();
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(30), slow.message()).await {
            Ok(Ok(Some(message))) => {
                slow_seen.push(TaskEvent::from(message.event.expect("event")));
            }
            Ok(Ok(None)) => panic!("slow stream ended without an error"),
            Ok(Err(status)) => break status,
            Err(_) => panic!("slow stream neither delivered nor failed"),
        }
    };
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
    // Its buffer plus what fit in the HTTP/2 windows: bounded, not 50,000.
    assert!(
        slow_seen.len() < 3 * BUFFER,
        "the slow subscriber was cut off early, not after {} events",
        slow_seen.len()
    );
    let resume_after: u64 = status
        .metadata()
        .get(kairos_proto::wire::RESUME_TRAILER)
        .expect("resume trailer")
        .to_str()
        .expect("ascii")
        .parse()
        .expect("number");
    assert_eq!(
        resume_after,
        slow_seen.last().map_or(start, |e| e.cursor),
        "the trailer names the last event delivered"
    );
    assert!(
        status
            .message()
            .contains(&format!("after_cursor={resume_after}"))
    );

    let mut rest = slow_client
        .subscribe(
            Subscribe::all().queue("flood").after(resume_after),
            PATIENCE,
        )
        .await
        .expect("resume");
    let rest_seen = read_n(&mut rest, EVENTS - slow_seen.len(), Duration::from_secs(60)).await;
    let union: Vec<TaskEvent> = slow_seen.into_iter().chain(rest_seen).collect();
    assert_eq!(
        union, fast_seen,
        "resumed, the slow subscriber has every event once"
    );
}

/// 100 subscribers with different filters each get exactly the events their
/// filter selects, in log order.
async fn hundred_subscribers_each_get_their_filter(backend: Backend) {
    let stack = Stack::start(backend).await;
    let server = stack.server().await;
    let mut producer = client(&server).await;
    let queues = ["f0", "f1", "f2", "f3"];
    let state_sets: [&[TaskState]; 4] = [
        &[],
        &[Succeeded],
        &[Scheduled, Cancelled],
        &[Dispatched, Running],
    ];
    let mut truth = producer
        .subscribe(Subscribe::all(), PATIENCE)
        .await
        .expect("truth");

    // Book first (short delay), so some subscribers can name task ids.
    let mut ids: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for queue in queues {
        ids.insert(
            queue,
            book(&mut producer, queue, 25, Duration::from_secs(5)).await,
        );
    }
    let mut filters = Vec::new();
    for i in 0..100 {
        let queue = queues[i % 4];
        let mut filter = Subscribe::all().states(state_sets[(i / 4) % 4].iter().copied());
        match i % 3 {
            0 => filter = filter.queue(queue),
            1 => {
                for id in ids[queue].iter().skip(i % 5).step_by(3) {
                    filter = filter.task(id.clone());
                }
            }
            _ => {}
        }
        filters.push(filter);
    }
    let mut streams = Vec::new();
    for filter in &filters {
        // From the first booking on, so the filters see the SCHEDULED events too.
        streams.push(
            producer
                .subscribe(filter.clone().after(0), PATIENCE)
                .await
                .expect("subscribe"),
        );
    }
    // Cancel every fifth task of each queue; the rest run.
    for list in ids.values() {
        for id in list.iter().step_by(5) {
            producer.cancel(id).await.expect("cancel");
        }
    }
    let log = RunLog::default();
    let mut workers = Vec::new();
    for queue in queues {
        workers.push(stack.worker(&server, queue, 4, log.handler()));
    }
    let all = read_until(&mut truth, Duration::from_secs(60), |seen| {
        seen.iter().filter(|e| e.state.is_final()).count() == 100
    })
    .await;
    assert_quiet(&mut truth, "unfiltered").await;
    assert_eq!(log.len(), 80, "all but the cancelled ran");

    let matches = |f: &Subscribe, e: &TaskEvent| {
        (f.task_ids.is_empty() || f.task_ids.contains(&e.task_id))
            && f.queue.as_ref().is_none_or(|q| *q == e.queue)
            && (f.states.is_empty() || f.states.contains(&e.state))
    };
    let checks = filters.iter().zip(streams).map(|(filter, mut stream)| {
        let expected: Vec<TaskEvent> = all.iter().filter(|e| matches(filter, e)).cloned().collect();
        async move {
            let seen = read_n(&mut stream, expected.len(), Duration::from_secs(30)).await;
            assert_eq!(seen, expected, "filter {filter:?}");
            assert_quiet(&mut stream, "filtered").await;
            expected.len()
        }
    });
    let counts = futures::future::join_all(checks).await;
    assert!(
        counts.iter().all(|&n| n > 0),
        "every filter selects something"
    );
    assert!(
        counts.iter().any(|&n| n < all.len() / 4),
        "filters do narrow"
    );
}

/// A graceful shutdown ends the stream with UNAVAILABLE and the cursor to
/// resume from; a subscriber carries on on another replica from it, and the
/// Rust client's own stream reopens by itself once the address serves again.
async fn shutdown_ends_streams_with_a_resumable_error(backend: Backend) {
    let stack = Stack::start(backend).await;
    let mut a = stack.server().await;
    let b = stack.server().await;
    let mut producer = client(&b).await;
    let mut raw = client(&a).await;
    let (mut stream, _) = raw
        .subscribe_once(&Subscribe::all().queue("bye"))
        .await
        .expect("subscribe");
    let mut auto = raw
        .subscribe(Subscribe::all().queue("bye"), PATIENCE)
        .await
        .expect("self-resuming subscribe");
    let first = book(&mut producer, "bye", 3, Duration::from_secs(3600)).await;
    let mut seen = Vec::new();
    while seen.len() < first.len() {
        let message = stream.message().await.expect("healthy").expect("open");
        seen.push(TaskEvent::from(message.event.expect("event")));
    }

    let stopping = tokio::time::Instant::now();
    a.stop().await.expect("clean stop");
    assert!(
        stopping.elapsed() < Duration::from_secs(4),
        "open streams did not hold up the shutdown"
    );
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let after = seen.last().expect("seen").cursor;
    assert!(status.message().contains(&format!("after_cursor={after}")));

    let second = book(&mut producer, "bye", 3, Duration::from_secs(3600)).await;
    let elsewhere = client(&b).await;
    let mut resumed = elsewhere
        .subscribe(Subscribe::all().queue("bye").after(after), PATIENCE)
        .await
        .expect("resume on B");
    let rest = read_n(&mut resumed, second.len(), Duration::from_secs(10)).await;
    let ids: Vec<String> = rest.into_iter().map(|e| e.task_id).collect();
    assert_eq!(ids, second);

    // A replica comes back on A's address: the self-resuming stream, which
    // read nothing while A was down, delivers all six bookings once each.
    let address = a.url.trim_start_matches("http://").to_owned();
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .expect("A's port again");
    let _a_again = stack.server_on(stack.config(), listener).await;
    let all = read_n(
        &mut auto,
        first.len() + second.len(),
        Duration::from_secs(30),
    )
    .await;
    assert_quiet(&mut auto, "self-resumed").await;
    assert_cursors_increase(&all);
    let ids: Vec<String> = all.into_iter().map(|e| e.task_id).collect();
    assert_eq!(ids, [first, second].concat());
}

/// Bad subscriptions are refused with the field at fault; a cursor older
/// than the retained events is OUT_OF_RANGE.
async fn bad_subscriptions_are_rejected(backend: Backend) {
    let stack = Stack::start(backend).await;
    let server = stack.server().await;
    let mut client = client(&server).await;
    let base = client.clone();
    let field_of = |err: ClientError| (err.code, err.field);
    let refused = |sub: Subscribe| {
        let mut client = base.clone();
        async move {
            client
                .subscribe_once(&sub)
                .await
                .map(|_| ())
                .expect_err("refused")
        }
    };
    assert_eq!(
        field_of(refused(Subscribe::all().from_beginning()).await),
        (
            tonic::Code::InvalidArgument,
            Some("from_beginning".to_owned())
        )
    );
    assert_eq!(
        field_of(refused(Subscribe::all().task("not-a-uuid")).await),
        (tonic::Code::InvalidArgument, Some("task_ids[0]".to_owned()))
    );
    assert_eq!(
        field_of(refused(Subscribe::all().queue("a.b")).await),
        (tonic::Code::InvalidArgument, Some("queue".to_owned()))
    );
    let request = pb::SubscribeRequest {
        states: vec![pb::TaskState::Unspecified as i32],
        ..Default::default()
    };
    let status = client.raw().subscribe(request).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let request = pb::SubscribeRequest {
        after_cursor: Some(3),
        from_beginning: true,
        task_ids: vec![uuid_like()],
        ..Default::default()
    };
    let status = client.raw().subscribe(request).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // Prune by hand what retention would remove: old cursors are refused.
    // Three rows pruned: a row's events end at cursor 4 * id.
    book(&mut client, "old", 5, Duration::from_secs(3600)).await;
    stack
        .execute_sql("UPDATE event_horizon SET pruned_through = $1", &[3])
        .await;
    let err = refused(Subscribe::all().after(11)).await;
    assert_eq!(err.code, tonic::Code::OutOfRange, "{err}");
    let mut ok = client
        .subscribe(Subscribe::all().queue("old").after(12), PATIENCE)
        .await
        .expect("a retained cursor");
    read_n(&mut ok, 2, Duration::from_secs(10)).await;
}

fn uuid_like() -> String {
    "01890a5d-ac96-774b-bcce-b302099a8057".to_owned()
}

backend_tests!(
    events_follow_each_task_in_order,
    schedule_filter_follows_its_occurrences,
    events_from_every_replica_reach_every_subscriber,
    resume_on_another_replica_has_no_gap_and_no_duplicate,
    slow_subscriber_is_cut_off_and_can_resume,
    hundred_subscribers_each_get_their_filter,
    shutdown_ends_streams_with_a_resumable_error,
    bad_subscriptions_are_rejected,
);

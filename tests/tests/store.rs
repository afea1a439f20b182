//! One conformance suite for the SQL store, run against SQLite and Postgres.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use chrono::{DateTime, Duration, Utc};
use kairos_server::domain::{
    AttemptOutcome, EventFilter, NewTask, Occurrence, StatusWrite, TaskId, TaskState, content_hash,
};
use kairos_server::store::{self, DynStore, InsertOutcome, TaskFilter};
use kairos_tests::stack::fresh_postgres_database;
use kairos_tests::{Backend, backend_tests};

async fn open(backend: Backend) -> (DynStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = match backend {
        Backend::Sqlite => format!("sqlite://{}", dir.path().join("store.db").display()),
        Backend::Postgres => fresh_postgres_database().await,
    };
    (store::connect(&url).await.expect("connect"), dir)
}

fn task(queue: &str, key: Option<&str>, payload: &str) -> NewTask {
    let now = DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).expect("now");
    let headers = BTreeMap::new();
    NewTask {
        id: TaskId::new(),
        queue: queue.into(),
        payload: Bytes::from(payload.to_owned()),
        content_type: "text/plain".into(),
        content_hash: content_hash(
            queue,
            payload.as_bytes(),
            "text/plain",
            &headers,
            "x",
            None,
            None,
        ),
        headers,
        due_at: now + Duration::seconds(30),
        expire_at: None,
        max_attempts: 3,
        idempotency_key: key.map(str::to_owned),
        backoff: None,
        created_at: now,
        occurrence: None,
    }
}

/// Inserted tasks read back exactly as stored, newest first, filtered and paged.
async fn tasks_round_trip_and_list_newest_first(backend: Backend) {
    let (store, _dir) = open(backend).await;
    let tasks: Vec<NewTask> = (0..5)
        .map(|i| task(if i % 2 == 0 { "even" } else { "odd" }, None, "p"))
        .collect();
    let buckets = vec![600_000; tasks.len()];
    let outcomes = store.insert_tasks(&tasks, &buckets).await.expect("insert");
    assert!(outcomes.iter().all(|o| *o == InsertOutcome::Inserted));

    let got = store
        .get_task(tasks[0].id)
        .await
        .expect("get")
        .expect("found");
    assert_eq!(got, tasks[0].clone().into_record(600_000));
    assert!(store.get_task(TaskId::new()).await.expect("get").is_none());

    let all = store
        .list_tasks(&TaskFilter {
            limit: 10,
            ..TaskFilter::default()
        })
        .await
        .expect("list");
    let ids: Vec<_> = all.iter().map(|t| t.id).collect();
    let mut newest_first: Vec<_> = tasks.iter().map(|t| t.id).collect();
    newest_first.reverse();
    assert_eq!(ids, newest_first);

    let even = store
        .list_tasks(&TaskFilter {
            queue: Some("even".into()),
            limit: 10,
            ..TaskFilter::default()
        })
        .await
        .expect("list");
    assert_eq!(even.len(), 3);
    let page = store
        .list_tasks(&TaskFilter {
            before: Some(ids[1]),
            limit: 2,
            ..TaskFilter::default()
        })
        .await
        .expect("page");
    assert_eq!(
        page.iter().map(|t| t.id).collect::<Vec<_>>(),
        ids[2..4].to_vec()
    );

    store.delete_tasks(&[tasks[0].id]).await.expect("delete");
    assert!(store.get_task(tasks[0].id).await.expect("get").is_none());
}

/// Every combination of ListTasks filters returns what a scan of all tasks
/// selects, newest first, page after page: rare states (read through their
/// partial index) and common ones, with and without a queue or schedule.
async fn every_list_filter_matches_a_full_scan(backend: Backend) {
    let (store, _dir) = open(backend).await;
    let schedule = TaskId::new();
    let mut tasks: Vec<NewTask> = (0..24)
        .map(|i| task(["a", "b", "c"][i % 3], None, "p"))
        .collect();
    for t in tasks.iter_mut().step_by(4) {
        t.occurrence = Some(Occurrence {
            schedule_id: schedule,
            fire_at: t.due_at,
        });
    }
    store
        .insert_tasks(&tasks, &vec![0; tasks.len()])
        .await
        .expect("insert");
    let ends = [
        TaskState::Scheduled,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Dead,
        TaskState::Retrying,
        TaskState::Cancelled,
    ];
    let mut writes = Vec::new();
    let mut state_of = HashMap::new();
    for (i, t) in tasks.iter().enumerate() {
        let end = ends[i * 7 % ends.len()];
        let at = t.created_at;
        let started = StatusWrite::Started {
            id: t.id,
            attempt: 1,
            worker_id: "w".into(),
            at,
        };
        match end {
            TaskState::Scheduled => {}
            TaskState::Running => writes.push(started),
            TaskState::Cancelled => writes.push(StatusWrite::Closed {
                id: t.id,
                state: end,
                at,
            }),
            _ => writes.extend([
                started,
                StatusWrite::Finished {
                    id: t.id,
                    attempt: 1,
                    worker_id: "w".into(),
                    state: end,
                    error: None,
                    detail: None,
                    at,
                },
            ]),
        }
        state_of.insert(t.id, end);
    }
    store.apply(&writes).await.expect("apply");

    let queues = [None, Some("a"), Some("b")];
    let states = [None].into_iter().chain(ends.map(Some));
    for state in states {
        for queue in queues {
            for by_schedule in [false, true] {
                let wanted = |t: &&NewTask| {
                    queue.is_none_or(|q| t.queue == q)
                        && state.is_none_or(|s| state_of[&t.id] == s)
                        && (!by_schedule || t.occurrence.is_some())
                };
                let mut expected: Vec<TaskId> = tasks.iter().filter(wanted).map(|t| t.id).collect();
                expected.reverse();
                let mut listed = Vec::new();
                let mut before = None;
                loop {
                    let page = store
                        .list_tasks(&TaskFilter {
                            queue: queue.map(str::to_owned),
                            state,
                            before,
                            schedule: by_schedule.then_some(schedule),
                            limit: 2,
                        })
                        .await
                        .expect("list");
                    listed.extend(page.iter().map(|t| t.id));
                    match page.last() {
                        Some(last) if page.len() == 2 => before = Some(last.id),
                        _ => break,
                    }
                }
                assert_eq!(
                    listed, expected,
                    "queue {queue:?}, state {state:?}, by schedule {by_schedule}"
                );
            }
        }
    }
}

/// A repeated idempotency key returns the existing task for the same content
/// and a conflict for other content; nothing new is stored.
async fn idempotency_keys_are_unique(backend: Backend) {
    let (store, _dir) = open(backend).await;
    let first = task("q", Some("k1"), "same");
    assert_eq!(
        store
            .insert_tasks(std::slice::from_ref(&first), &[0])
            .await
            .expect("insert"),
        vec![InsertOutcome::Inserted]
    );
    let outcomes = store
        .insert_tasks(
            &[
                task("q", Some("k1"), "same"),
                task("q", Some("k1"), "other"),
            ],
            &[0, 0],
        )
        .await
        .expect("insert");
    match &outcomes[0] {
        InsertOutcome::Existing(existing) => assert_eq!(existing.id, first.id),
        other => panic!("expected the existing task, got {other:?}"),
    }
    assert_eq!(outcomes[1], InsertOutcome::Conflict { key: "k1".into() });
    let all = store
        .list_tasks(&TaskFilter {
            limit: 10,
            ..TaskFilter::default()
        })
        .await
        .expect("list");
    assert_eq!(all.len(), 1);
}

/// Status writes build the run log and never move a task backwards, whatever
/// order they arrive in.
async fn status_writes_are_ordered_and_build_the_run_log(backend: Backend) {
    let (store, _dir) = open(backend).await;
    let t = task("q", None, "p");
    store
        .insert_tasks(std::slice::from_ref(&t), &[0])
        .await
        .expect("insert");
    let at = t.created_at;
    let started = |attempt| StatusWrite::Started {
        id: t.id,
        attempt,
        worker_id: "w".into(),
        at,
    };
    let finished = |attempt, state, error: Option<&str>| StatusWrite::Finished {
        id: t.id,
        attempt,
        worker_id: "w".into(),
        state,
        error: error.map(str::to_owned),
        detail: Some(format!("attempt {attempt}")),
        at: at + Duration::seconds(1),
    };
    store
        .apply(&[
            started(1),
            finished(1, TaskState::Retrying, Some("boom")),
            // Late and out of order: must not move the task back.
            StatusWrite::Dispatched { id: t.id, at },
            started(2),
            finished(2, TaskState::Succeeded, None),
            started(1),
        ])
        .await
        .expect("apply");
    let got = store.get_task(t.id).await.expect("get").expect("found");
    assert_eq!(got.state, TaskState::Succeeded);
    assert_eq!(got.attempts, 2);
    assert_eq!(got.last_error.as_deref(), Some("boom"));
    let runs = store.get_attempts(t.id).await.expect("runs");
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0].outcome, Some(AttemptOutcome::Failed));
    assert_eq!(runs[0].error.as_deref(), Some("boom"));
    assert_eq!(runs[1].outcome, Some(AttemptOutcome::Succeeded));
    assert_eq!(runs[1].finished_at, Some(at + Duration::seconds(1)));
    assert_eq!(runs[1].detail.as_deref(), Some("attempt 2"));

    store
        .apply(&[StatusWrite::Closed {
            id: t.id,
            state: TaskState::Cancelled,
            at,
        }])
        .await
        .expect("apply");
    let got = store.get_task(t.id).await.expect("get").expect("found");
    assert_eq!(
        got.state,
        TaskState::Succeeded,
        "a final state is never replaced"
    );
}

/// Two replicas' recorders apply batches over the same tasks in opposite
/// orders at the same time: neither fails (no lock-order deadlock).
async fn concurrent_batches_in_opposite_orders_do_not_deadlock(backend: Backend) {
    let (store, _dir) = open(backend).await;
    let tasks: Vec<NewTask> = (0..200).map(|_| task("q", None, "p")).collect();
    store
        .insert_tasks(&tasks, &vec![0; tasks.len()])
        .await
        .expect("insert");
    for round in 0..20u32 {
        let at = Utc::now();
        let forward: Vec<StatusWrite> = tasks
            .iter()
            .map(|t| StatusWrite::Started {
                id: t.id,
                attempt: round + 1,
                worker_id: "a".into(),
                at,
            })
            .collect();
        let mut backward = forward.clone();
        backward.reverse();
        let (a, b) = tokio::join!(store.apply(&forward), store.apply(&backward));
        a.expect("forward batch");
        b.expect("backward batch");
    }
    let got = store
        .get_task(tasks[0].id)
        .await
        .expect("get")
        .expect("found");
    assert_eq!(got.attempts, 20);
}

/// The recorder begins a batch once the one before holds its rows: the later
/// batch, though it runs alongside, sees the earlier one's changes, so a start
/// reported twice is logged once and each task's events stay in order.
async fn a_batch_begun_in_turn_applies_after_the_one_before(backend: Backend) {
    let (store, _dir) = open(backend).await;
    let tasks: Vec<NewTask> = (0..300).map(|_| task("q", None, "p")).collect();
    store
        .insert_tasks(&tasks, &vec![0; tasks.len()])
        .await
        .expect("insert");
    let at = Utc::now();
    let started: Vec<StatusWrite> = tasks
        .iter()
        .map(|t| StatusWrite::Started {
            id: t.id,
            attempt: 1,
            worker_id: "w".into(),
            at,
        })
        .collect();
    // The start again (a report sent twice), then the result.
    let mut finished = started.clone();
    finished.extend(tasks.iter().map(|t| StatusWrite::Finished {
        id: t.id,
        attempt: 1,
        worker_id: "w".into(),
        state: TaskState::Succeeded,
        error: None,
        detail: None,
        at,
    }));
    let (held, rows_held) = tokio::sync::oneshot::channel();
    let first = store.apply_in_turn(&started, Some(held));
    let second = async {
        rows_held.await.expect("the first batch holds its rows");
        store.apply(&finished).await
    };
    let (a, b) = tokio::join!(first, second);
    a.expect("first batch");
    b.expect("second batch");

    let events = store
        .read_events(0, i64::MAX, &EventFilter::default(), 10_000)
        .await
        .expect("events");
    let mut lives: HashMap<TaskId, Vec<TaskState>> = HashMap::new();
    for e in &events {
        lives.entry(e.task_id).or_default().push(e.state);
    }
    assert_eq!(lives.len(), tasks.len());
    for (id, life) in lives {
        assert_eq!(
            life,
            [
                TaskState::Scheduled,
                TaskState::Dispatched,
                TaskState::Running,
                TaskState::Succeeded
            ],
            "task {id}"
        );
    }
}

/// A task's changes in one batch are logged as one row and read back as
/// every change, each with its own cursor: a subscriber can resume between
/// them, filter by any of them and page through them, and a change logged
/// by an earlier batch is not logged again.
async fn changes_folded_into_one_row_read_back_one_by_one(backend: Backend) {
    let (store, _dir) = open(backend).await;
    let tasks: Vec<NewTask> = (0..3).map(|_| task("q", None, "p")).collect();
    store
        .insert_tasks(&tasks, &[0, 0, 0])
        .await
        .expect("insert");
    let (a, b, c) = (tasks[0].id, tasks[1].id, tasks[2].id);
    let t0 = DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).expect("now");
    let at = |s: i64| t0 + Duration::seconds(s);
    let started = |id, s| StatusWrite::Started {
        id,
        attempt: 1,
        worker_id: "w".into(),
        at: at(s),
    };
    let finished = |id, state, error: Option<&str>| StatusWrite::Finished {
        id,
        attempt: 1,
        worker_id: "w".into(),
        state,
        error: error.map(str::to_owned),
        detail: None,
        at: at(3),
    };
    store
        .apply(&[
            StatusWrite::Dispatched { id: a, at: at(1) },
            started(a, 2),
            finished(a, TaskState::Succeeded, None),
            started(b, 2),
            StatusWrite::Dispatched { id: c, at: at(1) },
        ])
        .await
        .expect("first batch");
    // b's start again (a report sent twice) with its result; c's release
    // was logged by the batch before.
    store
        .apply(&[
            started(c, 2),
            finished(c, TaskState::Retrying, Some("boom")),
            started(b, 2),
            finished(b, TaskState::Succeeded, None),
        ])
        .await
        .expect("second batch");

    let all = store
        .read_events(0, i64::MAX, &EventFilter::default(), 1000)
        .await
        .expect("events");
    assert!(all.windows(2).all(|p| p[0].cursor < p[1].cursor), "{all:?}");
    assert_eq!(
        store.last_event().await.expect("last"),
        all.last().expect("any").cursor
    );
    let life = |id: TaskId| -> Vec<_> { all.iter().filter(|e| e.task_id == id).collect() };
    use TaskState::{Dispatched, Retrying, Running, Scheduled, Succeeded};
    for (id, last) in [(a, Succeeded), (b, Succeeded), (c, Retrying)] {
        let states: Vec<TaskState> = life(id).iter().map(|e| e.state).collect();
        assert_eq!(states, [Scheduled, Dispatched, Running, last], "task {id}");
    }
    let a_life = life(a);
    assert_eq!(
        a_life[1..]
            .iter()
            .map(|e| e.cursor - a_life[1].cursor)
            .collect::<Vec<_>>(),
        [0, 1, 2],
        "a's release, start and result share one row"
    );
    let (dispatched, running, done) = (a_life[1], a_life[2], a_life[3]);
    assert_eq!(
        (
            dispatched.at,
            dispatched.attempt,
            dispatched.worker_id.as_str()
        ),
        (at(1), 0, "")
    );
    assert_eq!(
        (running.at, running.attempt, running.worker_id.as_str()),
        (at(2), 1, "w")
    );
    assert_eq!(
        (done.at, done.attempt, done.error.as_deref()),
        (at(3), 1, None)
    );
    let c_life = life(c);
    assert_eq!(
        c_life[3].cursor - c_life[2].cursor,
        1,
        "c's start and result share one row"
    );
    assert_eq!(
        (c_life[2].error.as_deref(), c_life[3].error.as_deref()),
        (None, Some("boom"))
    );

    // Resuming between a row's changes gives the rest of the row.
    let rest = store
        .read_events(dispatched.cursor, i64::MAX, &EventFilter::default(), 2)
        .await
        .expect("rest");
    assert_eq!(
        rest.iter().map(|e| e.cursor).collect::<Vec<_>>(),
        [running.cursor, done.cursor]
    );
    let upto = store
        .read_events(0, running.cursor, &EventFilter::default(), 1000)
        .await
        .expect("upto");
    assert_eq!(upto.last().map(|e| e.cursor), Some(running.cursor));

    // Resuming inside a row whose only match is behind the cursor still
    // gives the next match, not an empty page.
    let releases = EventFilter {
        states: vec![Dispatched],
        ..EventFilter::default()
    };
    let next = store
        .read_events(dispatched.cursor, i64::MAX, &releases, 1)
        .await
        .expect("next release");
    assert_eq!(
        next.iter()
            .map(|e| (e.task_id, e.state))
            .collect::<Vec<_>>(),
        [(b, Dispatched)]
    );

    // A state filter finds the changes folded into another's row.
    let filter = EventFilter {
        states: vec![Running],
        ..EventFilter::default()
    };
    let starts = store
        .read_events(0, i64::MAX, &filter, 1000)
        .await
        .expect("starts");
    assert_eq!(starts.len(), 3);
    assert!(starts.iter().all(|e| e.state == Running));

    // Small pages, each resumed from the last cursor, give the whole log.
    for limit in [1, 2, 3] {
        let mut paged = Vec::new();
        let mut after = 0;
        loop {
            let page = store
                .read_events(after, i64::MAX, &EventFilter::default(), limit)
                .await
                .expect("page");
            paged.extend(page.iter().map(|e| e.cursor));
            match page.last() {
                Some(last) if page.len() == limit as usize => after = last.cursor,
                _ => break,
            }
        }
        assert_eq!(
            paged,
            all.iter().map(|e| e.cursor).collect::<Vec<_>>(),
            "pages of {limit}"
        );
    }
}

backend_tests!(
    a_batch_begun_in_turn_applies_after_the_one_before,
    changes_folded_into_one_row_read_back_one_by_one,
    concurrent_batches_in_opposite_orders_do_not_deadlock,
    tasks_round_trip_and_list_newest_first,
    every_list_filter_matches_a_full_scan,
    idempotency_keys_are_unique,
    status_writes_are_ordered_and_build_the_run_log,
);
